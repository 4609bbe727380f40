"""Gantt charts of pipeline timelines, simulated or measured: one row per rank."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING

from partition.errors import PlanError
from partition.schedules.actions import Kind

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from partition.schedules.simulate import TimelineEvent

__all__ = ["plot_gantt"]

_COLOURS = {
    Kind.F: "#4C72B0",
    Kind.B: "#DD8452",
    Kind.I: "#C44E52",
    Kind.W: "#55A868",
    Kind.SEND_F: "#555555",
    Kind.SEND_B: "#555555",
    Kind.RECV_F: "#BBBBBB",
    Kind.RECV_B: "#BBBBBB",
}
_LABELS = {Kind.F: "forward", Kind.B: "backward", Kind.I: "backward (input)"}
_LABELS |= {Kind.W: "backward (weight)", Kind.SEND_F: "send", Kind.RECV_F: "waiting to receive"}
_SEND, _RECV = (Kind.SEND_F, Kind.SEND_B), (Kind.RECV_F, Kind.RECV_B)


def plot_gantt(
    timeline: Iterable[TimelineEvent],
    *,
    num_ranks: int,
    title: str | None = None,
    path: str | os.PathLike[str] | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Draw ``(rank, action, start, end)`` events as a Gantt chart, rank 0 on top.

    Compute is a tall box coloured by kind (F, B, I, W), with the micro-batch written in boxes
    wide enough for it; later virtual stages of a rank are drawn lighter. Sends (time on the
    link) and waits for receives are a thin strip under the rank's row.

    Args:
        timeline: events from :attr:`~partition.schedules.simulate.SimResult.timeline` or the runtime.
        num_ranks: rows to draw.
        title: figure title.
        path: write a PNG there.
        ax: draw into these axes instead of a new figure.

    Returns:
        The figure drawn on.

    Raises:
        PlanError: (a ``ValueError``) an event names a rank outside ``0 .. num_ranks - 1``.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    events = list(timeline)
    if ax is None:
        fig = Figure(figsize=(10, 1.0 + 0.55 * num_ranks), layout="constrained")
        ax = fig.add_subplot()
    else:
        parent = ax.get_figure()
        assert isinstance(parent, Figure), "ax must belong to a Figure"
        fig = parent
    span = max((end for *_, end in events), default=1.0) or 1.0
    bars: dict[tuple[int, Kind, int], list[tuple[float, float]]] = defaultdict(list)
    labels = []
    for rank, action, start, end in events:
        if not 0 <= rank < num_ranks:
            raise PlanError(
                f"event on rank {rank} but num_ranks={num_ranks}: {action}; pass the timeline's "
                "number of ranks"
            )
        if end <= start:
            continue
        kind = action.kind
        kind = Kind.SEND_F if kind in _SEND else Kind.RECV_F if kind in _RECV else kind
        chunk = action.stage // num_ranks if kind in _LABELS and kind not in _SEND else 0
        bars[(rank, kind, chunk)].append((start, end - start))
        if kind not in (Kind.SEND_F, Kind.RECV_F) and (end - start) > span / 70:
            labels.append((start + (end - start) / 2, rank, chunk, str(action.microbatch)))
    chunks = 1 + max((c for _, _, c in bars), default=0)
    alpha = [1.0 - 0.45 * c / max(chunks - 1, 1) for c in range(chunks)]
    for (rank, kind, chunk), spans in bars.items():
        comm = kind in (Kind.SEND_F, Kind.RECV_F)
        y, h = (rank + 0.28, 0.14) if comm else (rank - 0.4, 0.62)
        ax.broken_barh(
            spans, (y, h), facecolors=_COLOURS[kind], edgecolor="white", alpha=alpha[chunk]
        )
    if len(labels) <= 400:
        for x, rank, chunk, text in labels:
            colour = "white" if alpha[chunk] > 0.75 else "black"
            ax.text(x, rank - 0.09, text, ha="center", va="center", fontsize=7, color=colour)
    present = {kind for _, kind, _ in bars}
    handles = [Patch(color=_COLOURS[k], label=_LABELS[k]) for k in _LABELS if k in present]
    if chunks > 1:
        handles.append(Patch(color=_COLOURS[Kind.F], alpha=alpha[-1], label="later virtual stage"))
    ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.12 - 0.3 / max(num_ranks, 1)),
        ncol=6,
        frameon=False,
        fontsize=8,
    )
    ax.set_yticks(range(num_ranks), [f"rank {r}" for r in range(num_ranks)])
    ax.set_ylim(num_ranks - 0.5, -0.6)
    ax.set_xlim(0, span)
    ax.set_xlabel("time (s)")
    if title:
        ax.set_title(title)
    if path is not None:
        fig.savefig(path, dpi=120)  # a bare Figure renders with Agg; no pyplot, no GUI
    return fig
