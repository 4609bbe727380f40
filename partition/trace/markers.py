"""``pipe_split()`` markers: a `torch.distributed.pipelining` model's own stage boundaries.

[Note: pipe_split markers]
A model written for `torch.distributed.pipelining` calls ``pipe_split()`` between layers. The
marker is the no-argument op ``torch.ops.pippy._pipe_split``: ``torch.export`` keeps it in the
graph, but symbolic tracing would run it and record nothing, since no proxy flows through it, so
the fx route watches for it with a `TorchFunctionMode` while tracing and records a node for each
call. Either way the marker nodes are then taken out of the graph (no stage ever runs one) and
each remaining node is labelled with its *segment*, the number of markers before it in program
order (``node.meta[SEGMENT]``).

The partitioner ignores them. ``cuts="markers"`` (``--cuts markers``) takes them as the user's
own cuts instead: `marker_bounds` gives one stage per segment, so a plan needs exactly
``markers + 1`` stages (devices × virtual stages).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch.overrides import TorchFunctionMode

from partition.errors import PlanError

if TYPE_CHECKING:
    from partition.graph import LinearGraph
    from partition.trace.traced import TracedModel

__all__ = ["SEGMENT", "marker_bounds", "record_markers", "take_markers"]

SEGMENT = "pipepart_segment"


def _marker_ops() -> tuple[Any, ...]:
    if "torch.distributed.pipelining" not in sys.modules:  # nobody can have called pipe_split
        return ()
    packet = torch.ops.pippy._pipe_split
    return (packet, packet.default)


class _RecordMarkers(TorchFunctionMode):
    def __init__(self, tracer: fx.Tracer, ops: tuple[Any, ...]) -> None:
        super().__init__()
        self.tracer, self.ops = tracer, ops

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if func in self.ops:
            self.tracer.create_node("call_function", self.ops[1], (), {})
            return None
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def record_markers(tracer: fx.Tracer) -> Iterator[None]:
    """While ``tracer`` traces, each ``pipe_split()`` call becomes a node of its graph."""
    ops = _marker_ops()
    if not ops:
        yield
        return
    with _RecordMarkers(tracer, ops):
        yield


def _is_marker(node: fx.Node) -> bool:
    return node.op == "call_function" and any(node.target is op for op in _marker_ops())


def take_markers(graph: fx.Graph) -> int:
    """Remove the marker nodes of ``graph`` and label every other node with its segment;
    returns the number of markers. See [Note: pipe_split markers]."""
    segment = 0
    for node in list(graph.nodes):
        if _is_marker(node):
            graph.erase_node(node)
            segment += 1
        else:
            node.meta[SEGMENT] = segment
    return segment


def marker_bounds(traced: TracedModel, graph: LinearGraph) -> list[int]:
    """The stage bounds of one stage per marker-separated segment of ``graph``'s order.

    Raises:
        PlanError: the model has no markers, a segment holds no operation (two markers in a
            row, or one at either end), or the node order mixes segments (plan with
            ``order="graph"``).
    """
    if traced.markers == 0:
        raise PlanError(
            f"{_model_name(traced)} has no pipe_split() markers to cut at; add "
            "torch.distributed.pipelining.pipe_split() calls between layers, or let the "
            "partitioner choose the cuts (leave out cuts='markers' / --cuts markers)"
        )
    by_name = {n.name: n for n in traced.graph.nodes}
    bounds, current = [0], 0
    for i, name in enumerate(graph.names):
        node = by_name[name]
        if node.op in ("placeholder", "get_attr"):
            continue  # inputs enter at stage 0; parameters are read where they are used
        segment = int(node.meta.get(SEGMENT, 0))
        if segment < current:
            raise PlanError(
                f"node {name!r} (segment {segment}) comes after segment {current} in the "
                f"{graph.extra.get('order', 'chosen')} node order; plan with order='graph'"
            )
        while current < segment:
            bounds.append(i)
            current += 1
    bounds.append(len(graph))
    stages = traced.markers + 1
    empty = [s for s in range(len(bounds) - 1) if bounds[s] >= bounds[s + 1]]
    if len(bounds) != stages + 1 or empty:
        which = empty[0] if empty else len(bounds) - 1
        raise PlanError(
            f"the pipe_split() markers of {_model_name(traced)} leave segment {which} of "
            f"{stages} without an operation (two markers in a row, or one before the first or "
            "after the last operation); remove that marker"
        )
    return bounds


def _model_name(traced: TracedModel) -> str:
    return str(getattr(traced.model, "model_class", type(traced.model).__name__))
