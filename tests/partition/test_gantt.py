"""Gantt charts (`partition.schedules.gantt.plot_gantt`) of hand-made timelines: one row per rank
(rank 0 on top), each action a box where its times say, coloured by kind, sends and waits a thin
strip, later virtual stages lighter, a PNG of the figure's size; events on a rank that is not
drawn refused with `PlanError`. Drawn with Agg into bare Figures, no pyplot.

`tests/partition/test_simulate.py` draws simulated timelines; here every box is checked
against the numbers it was made from.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from partition.errors import PlanError
from partition.schedules.actions import Action, Kind
from partition.schedules.gantt import plot_gantt
from partition.schedules.simulate import TimelineEvent

if TYPE_CHECKING:
    from matplotlib.axes import Axes

matplotlib = pytest.importorskip("matplotlib")  # an optional dependency (dev)
matplotlib.use("Agg")
to_hex = pytest.importorskip("matplotlib.colors").to_hex
Figure = pytest.importorskip("matplotlib.figure").Figure

FORWARD, BACKWARD, INPUT, WEIGHT = "#4c72b0", "#dd8452", "#c44e52", "#55a868"
SEND, WAIT = "#555555", "#bbbbbb"


def _events(*rows: tuple[int, str, float, float]) -> list[TimelineEvent]:
    return [(rank, Action.parse(a), start, end) for rank, a, start, end in rows]


# Two ranks, 1F1B-like, in times that are exact in binary. Rank 1 waits for its input until 1,
# and its F1 takes no time (not drawn).
TWO_RANKS = _events(
    (0, "0F0", 0.0, 1.0),
    (0, "0SF0", 1.0, 1.25),
    (0, "0F1", 1.0, 2.0),
    (0, "0B0", 4.0, 6.0),
    (0, "0B1", 6.0, 8.0),
    (1, "1RF0", 0.0, 1.0),
    (1, "1F0", 1.25, 2.25),
    (1, "1B0", 2.25, 4.25),
    (1, "1F1", 5.0, 5.0),
)

Box = tuple[float, float, float, float, str, float]
"""(x from, x to, y from, y to, colour, alpha) of one drawn box."""


def _boxes(ax: Axes) -> set[Box]:
    out = set()
    for collection in ax.collections:
        rgba = collection.get_facecolor()[0]
        for path in collection.get_paths():
            xs, ys = path.vertices[:, 0], path.vertices[:, 1]
            out.add(
                (
                    float(xs.min()),
                    float(xs.max()),
                    round(float(ys.min()), 6),
                    round(float(ys.max()), 6),
                    to_hex(rgba[:3]),
                    round(float(rgba[3]), 6),
                )
            )
    return out


def _compute(rank: int, start: float, end: float, colour: str, alpha: float = 1.0) -> Box:
    """A compute box: tall, centred a little above the rank's row."""
    return (start, end, round(rank - 0.4, 6), round(rank + 0.22, 6), colour, alpha)


def _strip(rank: int, start: float, end: float, colour: str, alpha: float = 1.0) -> Box:
    """A send or a wait: thin, under the rank's row."""
    return (start, end, round(rank + 0.28, 6), round(rank + 0.42, 6), colour, alpha)


def test_one_row_per_rank_rank_0_on_top_time_from_0_to_the_last_end() -> None:
    fig = plot_gantt(TWO_RANKS, num_ranks=3, title="two of three")
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["rank 0", "rank 1", "rank 2"]
    assert list(ax.get_yticks()) == [0, 1, 2]
    assert ax.get_ylim() == (2.5, -0.6)  # inverted: rank 0 at the top
    assert ax.get_xlim() == (0.0, 8.0)
    assert ax.get_title() == "two of three" and ax.get_xlabel() == "time (s)"


def test_every_action_is_a_box_where_its_times_say() -> None:
    (ax,) = plot_gantt(TWO_RANKS, num_ranks=2).axes
    assert _boxes(ax) == {
        _compute(0, 0.0, 1.0, FORWARD),
        _compute(0, 1.0, 2.0, FORWARD),
        _compute(0, 4.0, 6.0, BACKWARD),
        _compute(0, 6.0, 8.0, BACKWARD),
        _strip(0, 1.0, 1.25, SEND),
        _compute(1, 1.25, 2.25, FORWARD),
        _compute(1, 2.25, 4.25, BACKWARD),
        _strip(1, 0.0, 1.0, WAIT),
    }  # 1F1 took no time: no box


def test_compute_boxes_are_labelled_with_their_micro_batch() -> None:
    (ax,) = plot_gantt(TWO_RANKS, num_ranks=2).axes
    labels = sorted((t.get_position(), t.get_text()) for t in ax.texts)
    assert labels == sorted(
        [
            ((0.5, -0.09), "0"),
            ((1.5, -0.09), "1"),
            ((5.0, -0.09), "0"),
            ((7.0, -0.09), "1"),
            ((1.75, 0.91), "0"),
            ((3.25, 0.91), "0"),
        ]
    )


def test_the_legend_names_the_kinds_drawn_only() -> None:
    (ax,) = plot_gantt(TWO_RANKS, num_ranks=2).axes
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [
        "forward",
        "backward",
        "send",
        "waiting to receive",
    ]
    only_forward = _events((0, "0F0", 0.0, 1.0))
    (ax,) = plot_gantt(only_forward, num_ranks=1).axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["forward"]


def test_zero_bubble_backward_halves_have_their_own_colours() -> None:
    events = _events(
        (0, "0F0", 0.0, 1.0), (0, "0I0", 1.0, 2.0), (0, "0W0", 2.0, 3.0), (0, "0SB0", 2.0, 2.5)
    )
    (ax,) = plot_gantt(events, num_ranks=1).axes
    assert _boxes(ax) == {
        _compute(0, 0.0, 1.0, FORWARD),
        _compute(0, 1.0, 2.0, INPUT),
        _compute(0, 2.0, 3.0, WEIGHT),
        _strip(0, 2.0, 2.5, SEND),  # a backward send is drawn as a send
    }
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts == ["forward", "backward (input)", "backward (weight)", "send"]


def test_a_later_virtual_stage_of_a_rank_is_lighter() -> None:
    """Two ranks, two stages each: stages 2 and 3 are the second chunk of ranks 0 and 1."""
    events = _events(
        (0, "0F0", 0.0, 1.0),
        (0, "2F0", 2.0, 3.0),
        (1, "1F0", 1.0, 2.0),
        (1, "3F0", 3.0, 4.0),
        (0, "2SF0", 3.0, 3.5),
    )
    (ax,) = plot_gantt(events, num_ranks=2).axes
    assert _boxes(ax) == {
        _compute(0, 0.0, 1.0, FORWARD),
        _compute(1, 1.0, 2.0, FORWARD),
        _compute(0, 2.0, 3.0, FORWARD, alpha=0.55),
        _compute(1, 3.0, 4.0, FORWARD, alpha=0.55),
        _strip(0, 3.0, 3.5, SEND),  # sends are not shaded by chunk
    }
    assert ax.get_legend().get_texts()[-1].get_text() == "later virtual stage"
    colours = {t.get_position()[0]: t.get_color() for t in ax.texts}
    assert colours == {0.5: "white", 1.5: "white", 2.5: "black", 3.5: "black"}  # readable


def test_labels_are_left_out_past_400() -> None:
    """8 ranks of unit boxes: every box is wide enough for a label, but more than 400 of them
    would be unreadable, so there are none."""

    def grid(per_rank: int) -> list[TimelineEvent]:
        return [
            (r, Action(r, Kind.F, k), float(k), k + 1.0) for r in range(8) for k in range(per_rank)
        ]

    assert len(plot_gantt(grid(50), num_ranks=8).axes[0].texts) == 400
    assert len(plot_gantt(grid(51), num_ranks=8).axes[0].texts) == 0


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.mark.parametrize(("ranks", "height"), [(1, 186), (2, 252), (4, 384)])
def test_the_png_is_10_inches_wide_and_grows_a_row_per_rank(
    tmp_path: Path, ranks: int, height: int
) -> None:
    """At 120 dpi: 1200 pixels wide, (1 + 0.55 per rank) inches high."""
    path = tmp_path / "gantt.png"
    plot_gantt(_events((0, "0F0", 0.0, 1.0)), num_ranks=ranks, path=path)
    assert _png_size(path) == (1200, height)


def test_it_draws_into_given_axes_and_takes_any_iterable(tmp_path: Path) -> None:
    fig = Figure()
    left, right = fig.subplots(1, 2)
    assert plot_gantt(iter(TWO_RANKS), num_ranks=2, ax=right) is fig
    assert fig.axes == [left, right]
    assert len(_boxes(right)) == 8 and not left.collections


def test_an_empty_timeline_draws_empty_rows() -> None:
    (ax,) = plot_gantt([], num_ranks=2).axes
    assert len(ax.collections) == 0 and len(ax.texts) == 0
    assert ax.get_xlim() == (0.0, 1.0)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["rank 0", "rank 1"]


@pytest.mark.parametrize("rank", [-1, 2, 7])
def test_an_event_on_a_rank_not_drawn_is_refused_and_nothing_is_written(
    tmp_path: Path, rank: int
) -> None:
    events = [*TWO_RANKS, (rank, Action.parse("1F0"), 0.0, 1.0)]
    path = tmp_path / "gantt.png"
    with pytest.raises(PlanError) as caught:
        plot_gantt(events, num_ranks=2, path=path)
    assert isinstance(caught.value, ValueError)
    assert str(caught.value) == (
        f"event on rank {rank} but num_ranks=2: 1F0; pass the timeline's number of ranks"
    )
    assert not path.exists()
