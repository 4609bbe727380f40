"""The bundled example models under their public path; they live in `partition.models.examples`."""

from partition.models.examples import *  # noqa: F403
from partition.models.examples import __all__  # noqa: F401
