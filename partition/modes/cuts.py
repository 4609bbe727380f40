"""Which cuts of a model's traced graph carry over to its other mode: those the planner may use.

[Note: cuts valid in both modes]
A model whose forward reads ``self.training`` has two graphs, and a pipeline stage holds both
(`partition.modes.split.modal_stages`): a cut must carry over to the other mode — each other-mode
node follows a side, no stage is empty in either mode, the tensors crossing pair up one to one
with the same shapes, and each stage holds the parameters and buffers its other-mode graph
reads. `mode_cuts` answers that for every cut position of the planned order at once, by the
rules `modal_stages` applies, so the planner searches only cuts that build:

* `partition.modes.split.assign` combines stages with ``max``, ``min`` and comparisons only, so
  run once with each node's *position* as its stage it gives every other-mode node the last
  cut it follows: the side of any cut is read off it, and a node that cannot follow its partner
  rules out the cuts between the two;
* a tensor crosses cut ``j`` while it is made before ``j`` and read at or after it (by
  `partition.wires.live_tensors`' rule, in-place results folded into the tensor they wrote):
  sweeping the cuts in order, each tensor joins and leaves once, and the crossing tensors of
  both modes are paired at every cut (`partition.modes.split.match_wires`);
* a tensor both modes read must be held by the same side in both, and one only the other mode
  reads by one side (the stage then holds it for that mode);
* a stage empty in the other mode depends on two cuts, not one: of the cuts with the same
  other-mode nodes before them only the first is offered (`ModeCuts.usable`), which loses only
  where to put nodes of one mode (a ``num_batches_tracked`` update, a dropout mask).

Costs stay the traced mode's: the mode the model is in is the one ``Pipeline.step`` trains.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch.fx as fx

from partition.modes.modal import OtherMode
from partition.modes.split import align, assign, is_local, match_wires
from partition.trace.inplace import derived_from
from partition.trace.tensor_constants import constant_key
from partition.trace.traced import TracedModel
from partition.wires import Wire, tensor_paths

__all__ = ["ModeCuts", "mode_cuts"]


@dataclass(frozen=True)
class ModeCuts:
    """For each cut position ``0..n`` of the planned order: whether it carries over alone, and
    how many other-mode nodes come before it."""

    valid: tuple[bool, ...]
    before: tuple[int, ...]
    total: int
    """Nodes of the other mode."""

    def usable(self) -> list[int]:
        """The interior cuts the partitioner may place together: valid ones, each with more
        other-mode nodes before it than the one before it, and fewer than all (so no stage of
        either mode is empty); see [Note: cuts valid in both modes]."""
        out: list[int] = []
        seen = 0
        for j in range(1, len(self.valid) - 1):
            if self.valid[j] and seen < self.before[j] < self.total:
                out.append(j)
                seen = self.before[j]
        return out

    def accepts(self, bounds: Sequence[int]) -> bool:
        """Whether the split ``bounds`` carries over (every cut valid, no stage empty)."""
        counts = [0, *(self.before[j] for j in bounds[1:-1]), self.total]
        inner = all(self.valid[j] for j in bounds[1:-1])
        return inner and all(a < b for a, b in itertools.pairwise(counts))


def mode_cuts(traced: TracedModel, other: OtherMode, names: Sequence[str]) -> ModeCuts:
    """`ModeCuts` of the traced graph in the order ``names`` (a `LinearGraph`'s) against
    ``other``'s graph; see [Note: cuts valid in both modes]."""
    assert other.traced is not None
    b = other.traced
    n = len(names)
    by_name = {node.name: node for node in traced.graph.nodes}
    order = [by_name[name] for name in names]
    position = {node: i for i, node in enumerate(order)}
    partner = align(traced, b)
    side_b, conflicts = assign(b, partner, position, n)
    bad = np.zeros(n + 2, dtype=np.int64)  # +1 at the first cut ruled out, -1 after the last

    def rule_out(lo: int, hi: int) -> None:  # the cuts j with lo < j <= hi
        lo, hi = max(lo, 0), min(hi, n - 1)
        if lo < hi:
            bad[lo + 1] += 1
            bad[hi + 1] -= 1

    for _, s, t in conflicts:
        rule_out(s, t)
    _rule_out_tensors(traced, b, position, side_b, rule_out)
    spans_a = _spans(traced, order, position, n)
    nodes_b = [node for node in b.graph.nodes if node.op != "output"]
    spans_b = _spans(b, nodes_b, side_b, n)
    ruled = np.cumsum(bad)
    joins: list[list[tuple[int, fx.Node]]] = [[] for _ in range(n + 1)]
    for mode, spans in enumerate((spans_a, spans_b)):
        for node, (lo, _) in spans.items():
            joins[max(lo + 1, 1)].append((mode, node))
    live: tuple[dict[fx.Node, int], dict[fx.Node, int]] = ({}, {})
    valid = [False] * (n + 1)
    for j in range(1, n):
        for mode, node in joins[j]:
            live[mode][node] = (spans_a, spans_b)[mode][node][1]
        for crossing in live:
            for node in [x for x, hi in crossing.items() if hi < j]:
                del crossing[node]
        if ruled[j]:
            continue
        wires_a, wires_b = _wires(live[0]), _wires(live[1])
        perm, unpaired = match_wires(wires_a, wires_b, partner, _left_of(position, j, n))
        valid[j] = not unpaired and len(perm) == len(wires_b)
    steps = np.bincount([min(max(v + 1, 0), n) for v in side_b.values()], minlength=n + 1)
    before = np.cumsum(steps)  # before[j]: other-mode nodes whose side is left of cut j
    return ModeCuts(tuple(valid), tuple(int(c) for c in before), len(side_b))


def _left_of(position: dict[fx.Node, int], j: int, n: int) -> Callable[[fx.Node], bool]:
    """Whether a traced-mode node is before cut ``j`` (the output node never is)."""
    return lambda node: position.get(node, n) < j


def _wires(crossing: dict[fx.Node, int]) -> list[Wire]:
    return [(node, path) for node in crossing for path in tensor_paths(node.meta.get("val"))]


def _spans(
    g: TracedModel, nodes: Sequence[fx.Node], side: dict[fx.Node, int], n: int
) -> dict[fx.Node, tuple[int, int]]:
    """For each tensor node of ``g``: ``(lo, hi)``, it crosses the cuts ``lo < j <= hi`` (``side``:
    the last cut each node follows; model inputs cross from the start)."""
    reach: dict[fx.Node, int] = {}
    for node in nodes:
        if not is_local(g, node):
            reach[node] = max((side.get(u, n) for u in node.users), default=-1)
    by_name = {node.name: node for node in g.graph.nodes}
    for node in reversed(nodes):  # an in-place result or a view crosses as the tensor it wrote
        source = derived_from(node)
        first = by_name.get(source[0][0]) if source is not None else None
        if first is not None and first in reach and node in reach:
            reach[first] = max(reach[first], reach[node])
            reach[node] = -1
    return {
        node: (-1 if node.op == "placeholder" else side[node], hi)
        for node, hi in reach.items()
        if hi >= 0 and tensor_paths(node.meta.get("val"))
    }


def _rule_out_tensors(
    a: TracedModel,
    b: TracedModel,
    position: dict[fx.Node, int],
    side_b: dict[fx.Node, int],
    rule_out: Callable[[int, int], None],
) -> None:
    """Rule out the cuts that leave a stage without a tensor its other-mode graph reads: a
    tensor both modes read is read on the same sides of a cut in both; one only the other mode
    reads, on one side."""
    sides_a, sides_b = _readers(a, position), _readers(b, side_b)
    for name, sides in sides_b.items():
        held = sides_a.get(name)
        if held is None:
            rule_out(min(sides), max(sides))
        else:
            rule_out(max(held), max(sides))
            rule_out(min(sides), min(held))


def _readers(g: TracedModel, side: dict[fx.Node, int]) -> dict[str, list[int]]:
    """Each parameter and buffer ``g`` reads → the sides (positions) of the nodes reading it."""
    out: dict[str, list[int]] = {}
    for node in g.graph.nodes:
        if node.op == "call_module":
            for name in g.meta_state.module_state(str(node.target)):
                out.setdefault(f"{node.target}.{name}", []).append(side[node])
        elif is_local(g, node):
            target = g.param_placeholders.get(node.name, str(node.target))
            if constant_key(target) is None:
                sides = [side[u] for u in node.users if u in side]
                out.setdefault(target, []).extend(sides)
    return {name: sides for name, sides in out.items() if sides}
