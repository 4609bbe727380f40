"""The linear cost graph: nodes in one topological order with prefix-summable costs and cut widths.

The partitioner sees a model as ``n`` nodes in a fixed topological order. A stage is a contiguous
range ``[i, j)`` of that order; the boundary before node ``j`` is *cut* ``j`` and its width
``cut_bytes[j]`` is the bytes of every tensor produced before ``j`` and used at or after ``j``
(what the stage ending at ``j`` must send on). ``cut_bytes[0]`` and ``cut_bytes[n]`` are 0:
model inputs come from the data loader and outputs go to the loss on the last stage.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from partition.errors import PlanError
from partition.trace.inplace import derived_from

if TYPE_CHECKING:
    import torch.fx as fx

    from partition.cost import CostGraph
    from partition.trace.traced import TracedModel

__all__ = ["ORDERS", "LinearGraph", "linearize", "node_order"]

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
    buffer_bytes: FloatArray = field(default_factory=lambda: np.zeros(0))
    """Bytes of the buffers each node owns: memory without gradients or optimizer state
    (empty: none anywhere)."""
    dispatched: FloatArray = field(default_factory=lambda: np.zeros(0))
    """How many operations each node dispatches, each paying a device's fixed costs
    (`Device.dispatch_forward` and ``dispatch_backward``): 1 for a ``call_function``,
    ``call_module`` or ``call_method`` node, 0 for an input or a ``get_attr`` (they run no
    operation); a stage-level graph holds each stage's count (empty: 1 per node)."""

    def __post_init__(self) -> None:
        n = len(self.names)
        if n == 0:
            raise PlanError("the graph has no nodes to partition")
        if self.buffer_bytes.size == 0:
            object.__setattr__(self, "buffer_bytes", np.zeros(n))
        if self.dispatched.size == 0:
            object.__setattr__(self, "dispatched", np.ones(n))
        arrays = ("compute", "forward", "param_bytes", "saved_bytes", "buffer_bytes", "dispatched")
        for name in arrays:
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
    def uncosted(
        cls, names: tuple[str, ...], *, extra: dict[str, object] | None = None
    ) -> LinearGraph:
        """Only an order of nodes, every cost zero: enough to split along (`partition.split`
        reads the names alone), never to price."""
        zeros = np.zeros(len(names))
        return cls(
            names=names,
            module_paths=names,
            compute=zeros,
            forward=zeros,
            param_bytes=zeros,
            saved_bytes=zeros,
            cut_bytes=np.zeros(len(names) + 1),
            extra=dict(extra or {}),
            dispatched=zeros,
        )

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
        buffer_bytes: npt.ArrayLike = (),
        dispatched: npt.ArrayLike = (),
    ) -> LinearGraph:
        """A graph from plain arrays (tests, benchmarks, synthetic models).

        ``cut_bytes`` may have ``n - 1`` entries (interior cuts) or ``n + 1``; ``dispatched``
        defaults to one operation per node.
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
            buffer_bytes=np.asarray(buffer_bytes, dtype=np.float64),
            dispatched=np.asarray(dispatched, dtype=np.float64),
        )


# --- from a cost graph ----------------------------------------------------------------------

ORDERS: tuple[str, ...] = ("auto", "graph", "late")
_DISPATCHING = ("call_function", "call_module", "call_method")
"""The node kinds that run an operation (`LinearGraph.dispatched`)."""


def linearize(costs: CostGraph, order: str = "auto") -> LinearGraph:
    """The `LinearGraph` of a costed model in a topological order chosen for cheap cuts.

    [Note: node order]
    Stages are contiguous ranges of one topological order, so the order decides which cuts
    exist. Two candidates:

    * ``"graph"`` — the program order the tracer recorded;
    * ``"late"`` — every node placed as late as its users allow (a reverse Kahn sweep preferring
      the latest node in program order). Shape queries, ``get_attr`` and parameter placeholders
      then sit right before the op that reads them, and a residual block's branch is not
      interleaved with unrelated work, so fewer values are live across each cut.

    ``"auto"`` keeps the candidate with the smaller total cut width (the sum over all cuts of the
    bytes live across it); ties keep ``"graph"``. Whatever the order, a value that skips several
    stages (a residual, a mask) is charged on every cut it crosses.
    """
    best_name, best_nodes, best_cuts = "", [], np.zeros(0)
    for name, nodes in _candidates(costs.traced, order).items():
        cuts = _cut_bytes(nodes, costs)
        if not best_name or cuts.sum() < best_cuts.sum():
            best_name, best_nodes, best_cuts = name, nodes, cuts
    node_costs = [costs.nodes[n.name] for n in best_nodes]
    if costs.profiled_flops is not None and all(c.fwd_time is not None for c in node_costs):
        speed = costs.profiled_flops
        forward = np.array([c.fwd_time for c in node_costs], dtype=np.float64) * speed
        compute = forward + np.array([c.bwd_time for c in node_costs], dtype=np.float64) * speed
    else:
        forward = np.array(
            [c.fwd_flops + c.elementwise_flops / 3 for c in node_costs], dtype=np.float64
        )
        compute = np.array([c.flops for c in node_costs], dtype=np.float64)
    numel = sum(c.param_numel for c in node_costs)
    total_param_bytes = sum(c.param_bytes for c in node_costs)
    return LinearGraph(
        names=tuple(n.name for n in best_nodes),
        module_paths=tuple(c.module_path for c in node_costs),
        compute=compute,
        forward=forward,
        param_bytes=np.array([c.param_bytes for c in node_costs], dtype=np.float64),
        saved_bytes=np.array([c.saved_bytes for c in node_costs], dtype=np.float64),
        cut_bytes=best_cuts,
        param_element_size=total_param_bytes / numel if numel else 4.0,
        extra={"order": best_name},
        buffer_bytes=np.array([c.buffer_bytes for c in node_costs], dtype=np.float64),
        dispatched=np.array([float(n.op in _DISPATCHING) for n in best_nodes], dtype=np.float64),
    )


def node_order(traced: TracedModel, order: str) -> LinearGraph:
    """The nodes of ``traced`` in ``order`` (``graph`` or ``late``, as a plan records it), with
    no costs: what a rank that was given a plan cuts, without costing the model again."""
    if order not in ("graph", "late"):
        raise PlanError(f"a plan's node order is 'graph' or 'late', not {order!r}")
    names = tuple(n.name for n in _candidates(traced, order)[order])
    return LinearGraph.uncosted(names, extra={"order": order})


def _candidates(traced: TracedModel, order: str) -> dict[str, list[fx.Node]]:
    """The node orders ``order`` asks to compare, by name; see [Note: node order]."""
    if order not in ORDERS:
        raise PlanError(f"unknown node order {order!r}; choose one of {', '.join(ORDERS)}")
    all_nodes = [n for n in traced.graph.nodes if n.op != "output"]
    local = traced.param_placeholders
    inputs = [n for n in all_nodes if n.op == "placeholder" and n.name not in local]
    rest = [n for n in all_nodes if n not in inputs]
    candidates = {}  # model inputs come first: the data loader feeds them to stage 0
    if order in ("auto", "graph"):
        candidates["graph"] = inputs + rest
    if order in ("auto", "late"):
        candidates["late"] = inputs + [n for n in _late_order(all_nodes) if n not in inputs]
    return candidates


def _late_order(nodes: list[fx.Node]) -> list[fx.Node]:
    position = {n: i for i, n in enumerate(nodes)}
    pending = {n: sum(1 for u in n.users if u in position) for n in nodes}
    ready = [-position[n] for n in nodes if pending[n] == 0]
    heapq.heapify(ready)
    reversed_order: list[fx.Node] = []
    while ready:
        node = nodes[-heapq.heappop(ready)]
        reversed_order.append(node)
        for arg in node.all_input_nodes:
            if arg in position:
                pending[arg] -= 1
                if pending[arg] == 0:
                    heapq.heappush(ready, -position[arg])
    reversed_order.reverse()
    return reversed_order


def _cut_bytes(nodes: list[fx.Node], costs: CostGraph) -> FloatArray:
    """Bytes live across each cut of ``nodes`` (length n + 1): a difference-array sweep.

    Tensors that share storage cross a cut as one, as `partition.split` sends them (the tensor
    an in-place op wrote, the base of a written view): it stays live until the last use of any.
    """
    n = len(nodes)
    position = {node: i for i, node in enumerate(nodes)}
    delta = np.zeros(n + 2, dtype=np.float64)
    local = costs.traced.param_placeholders
    last_use = {node: max((position.get(u, n) for u in node.users), default=-1) for node in nodes}
    by_name = {node.name: node for node in nodes}
    for node in reversed(nodes):  # a chain folds into its first tensor
        source = derived_from(node)
        if source is not None and source[0][0] in by_name:
            base = by_name[source[0][0]]
            last_use[base] = max(last_use[base], last_use[node])
            last_use[node] = -1
    for i, node in enumerate(nodes):
        size = costs.nodes[node.name].output_bytes
        if not size or last_use[node] < 0 or node.op == "get_attr" or node.name in local:
            continue  # parameters are read where they are used, never sent
        last = last_use[node]  # the output node counts as n
        first = 1 if node.op == "placeholder" else i + 1  # every model input enters at stage 0
        if last >= first:
            delta[first] += size
            delta[last + 1] -= size
    cuts = np.cumsum(delta)[: n + 1]
    cuts[0] = cuts[n] = 0.0
    return cuts
