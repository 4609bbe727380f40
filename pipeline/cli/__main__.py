"""``python -m pipeline.cli``: the ``pipepart`` command."""

import sys

from pipeline.cli.command import main

if __name__ == "__main__":
    sys.exit(main())
