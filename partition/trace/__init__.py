"""Tracing: a model's FX graph on ``meta``, by symbolic tracing or ``torch.export``.

`partition.trace.fx` is the front door (``trace``) and the symbolic route; `export` the
``torch.export`` route; `traced` what both give (`TracedModel`); `meta` runs nodes on meta
tensors; `tensor_constants`, `functions`, `inplace` and `markers` carry what a graph needs
beyond its nodes (constants, custom autograd Functions, in-place writes, ``pipe_split()``), and
`assigns` what it cannot hold (attributes a forward assigns).
"""

from __future__ import annotations

from partition.trace.fx import TraceMethod, trace
from partition.trace.traced import TracedModel

__all__ = ["TraceMethod", "TracedModel", "trace"]
