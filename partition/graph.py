"""The linear cost graph: nodes in one topological order with prefix-summable costs and cut widths.

The partitioner sees a model as ``n`` nodes in a fixed topological order. A stage is a contiguous
range ``[i, j)`` of that order; the boundary before node ``j`` is *cut* ``j`` and its width
``cut_bytes[j]`` is the bytes of every tensor produced before ``j`` and used at or after ``j``
(what the stage ending at ``j`` must send on). ``cut_bytes[0]`` and ``cut_bytes[n]`` are 0:
model inputs come from the data loader and outputs go to the loss on the last stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from partition.errors import PlanError

__all__ = ["LinearGraph"]

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, eq=False)
class LinearGraph:
    """Per-node costs in a topological order (all per micro-batch of the planned size)."""

    names: tuple[str, ...]
    """Node names, in order."""
    module_paths: tuple[str, ...]
    """The user's module path of each node (``"h.3.attn"``), or ``""`` for free functions."""
    compute: FloatArray
    """Forward + backward FLOPs of each node (measured seconds × the profiled device's FLOP/s)."""
    forward: FloatArray
    """Forward share of ``compute`` (FLOPs), for the schedules that need F and B apart."""
    param_bytes: FloatArray
    """Bytes of the parameters each node owns (each parameter counted at its first user)."""
    saved_bytes: FloatArray
    """Bytes autograd keeps from each node's forward until its backward."""
    cut_bytes: FloatArray
    """Width of each cut, length ``n + 1``; see the module docstring."""
    param_element_size: float = 4.0
    """Bytes per parameter element (for the optimizer-state model)."""
    extra: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.names)
        if n == 0:
            raise PlanError("the graph has no nodes to partition")
        for name in ("compute", "forward", "param_bytes", "saved_bytes"):
            array = getattr(self, name)
            if array.shape != (n,):
                raise PlanError(f"{name} has shape {array.shape}, expected ({n},)")
            if np.any(array < 0) or not np.all(np.isfinite(array)):
                raise PlanError(f"{name} must be finite and non-negative")
        if self.cut_bytes.shape != (n + 1,):
            raise PlanError(f"cut_bytes has shape {self.cut_bytes.shape}, expected ({n + 1},)")
        if len(self.module_paths) != n:
            raise PlanError(f"{len(self.module_paths)} module paths for {n} nodes")

    def __len__(self) -> int:
        return len(self.names)

    @classmethod
    def from_arrays(
        cls,
        compute: npt.ArrayLike,
        param_bytes: npt.ArrayLike,
        saved_bytes: npt.ArrayLike,
        cut_bytes: npt.ArrayLike,
        *,
        forward: npt.ArrayLike | None = None,
        names: tuple[str, ...] | None = None,
    ) -> LinearGraph:
        """A graph from plain arrays (tests, benchmarks, synthetic models).

        ``cut_bytes`` may have ``n - 1`` entries (interior cuts) or ``n + 1``.
        """
        c = np.asarray(compute, dtype=np.float64)
        n = c.shape[0]
        cuts = np.asarray(cut_bytes, dtype=np.float64)
        if cuts.shape == (n - 1,):
            cuts = np.concatenate([[0.0], cuts, [0.0]])
        fwd = c / 3.0 if forward is None else np.asarray(forward, dtype=np.float64)
        node_names = names if names is not None else tuple(f"n{i}" for i in range(n))
        return cls(
            names=node_names,
            module_paths=node_names,
            compute=c,
            forward=fwd,
            param_bytes=np.asarray(param_bytes, dtype=np.float64),
            saved_bytes=np.asarray(saved_bytes, dtype=np.float64),
            cut_bytes=cuts,
        )
