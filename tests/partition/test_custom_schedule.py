"""Schedules a user writes (``--schedule @FILE``): parsed, checked against the run, and every
bad file refused with the rank and step that fail; see [Note: a schedule a user writes]."""

from __future__ import annotations

from pathlib import Path

import pytest

from partition.errors import PlanError
from partition.options import PlanOptions
from partition.schedules.actions import build_schedule, peak_inflight
from partition.schedules.custom import schedule_for
from partition.schedules.inflight import schedule_inflight
from partition.schedules.names import canonical_schedule, schedule_label

# 1F1B on 2 ranks with 4 micro-batches, but rank 0 warms up with 2 forwards instead of 1
WARM2 = "0F0 0F1 0F2 0B0 0F3 0B1 0B2 0B3\n1F0 1B0 1F1 1B1 1F2 1B2 1F3 1B3\n"


def _file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "schedule.txt"
    path.write_text(text)
    return f"@{path}"


def test_a_built_schedule_round_trips_through_a_file(tmp_path: Path) -> None:
    built = build_schedule("1f1b", 2, 4)
    loaded = schedule_for(_file(tmp_path, built.to_text() + "\n"), 2, 4)
    assert loaded.actions == built.actions and loaded.name == "custom"
    assert schedule_inflight(_file(tmp_path, built.to_text()), 2, 4) == (2, 1)


def test_a_written_schedule_keeps_comments_out_and_its_own_counts(tmp_path: Path) -> None:
    text = "# rank 0 warms up twice\n" + WARM2.replace("\n1F0", "  # rank 0\n1F0")
    spec = _file(tmp_path, text)
    assert canonical_schedule(spec) == WARM2.strip()
    assert peak_inflight(schedule_for(spec, 2, 4)) == [3, 1]
    assert schedule_label(canonical_schedule(spec)) == "custom (2 ranks)"
    options = PlanOptions(schedule=spec, microbatches=4)
    assert options.schedule == WARM2.strip() and options.virtual == 1
    interleaved = build_schedule("interleaved", 2, 2, 2).to_text()  # 4 stages on 2 ranks
    assert PlanOptions(schedule=interleaved, microbatches=2).virtual == 2
    with pytest.raises(PlanError, match=r"file has 2 stage.s. per rank, --virtual asks for 3"):
        PlanOptions(schedule=interleaved, microbatches=2, virtual=3)


@pytest.mark.parametrize(
    ("text", "ranks", "microbatches", "match"),
    [  # a deadlock: each rank's backward waits for the other's
        (
            "0F0 0B0 0F1 0B1\n1F1 1F0 1B0 1B1",
            2,
            2,
            r"\[rank 0 · step 1 · 0B0\] deadlock, no rank can advance: .*rank 1 step 0 \(1F1\)",
        ),
        (  # a leak: a forward with no backward
            "0F0 0F1 0B0\n1F0 1B0 1F1 1B1",
            2,
            2,
            r"\[rank 0 · step 1 · 0F1\] this forward has no backward.*add 0B1",
        ),
        (  # a micro-batch missed on one stage
            "0F0 0B0 0F1 0B1\n1F0 1B0",
            2,
            2,
            "stage 1 micro-batch 1 has no forward; add 1F1 on rank 1",
        ),
        (  # a stage out of range for 2 ranks x 1
            "0F0 0B0\n3F0 1F0 1B0",
            2,
            1,
            r"\[rank 1 · step 0 · 3F0\] stage must be in 0..1",
        ),
        (
            "0F0 0B0\n1F0 1B0",
            3,
            1,
            "the schedule file has 2 lines .* but the run has 3 ranks; use --ranks 2",
        ),
        (
            "0F0 0B0\n1F0 1B0",
            2,
            4,
            "runs micro-batches 0..0 .1. but the run has 4; use --microbatches 1",
        ),
        (
            "0F0 0F1 0B0 0B1\n1F0 1F1 1B1 1B0",  # backwards out of the order they arrive in
            2,
            2,
            "stage 1 sends gradients for micro-batches .1, 0.",
        ),
        ("0F0 0B0\n1F0 1X0", 2, 1, "rank 1 step 1: cannot parse action '1X0'"),
        ("0F0 0B0\n1F0 1B0 2F0 2B0", 2, 1, "names stages 0..2 on 2 ranks"),
    ],
)
def test_a_bad_file_says_which_rank_and_step(
    tmp_path: Path, text: str, ranks: int, microbatches: int, match: str
) -> None:
    with pytest.raises(PlanError, match=match):
        schedule_for(_file(tmp_path, text), ranks, microbatches)


def test_an_unreadable_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match=r"cannot read the schedule file .*missing.txt"):
        canonical_schedule(f"@{tmp_path / 'missing.txt'}")
    with pytest.raises(PlanError, match="holds no actions"):
        canonical_schedule(_file(tmp_path, "# nothing\n\n"))
    with pytest.raises(PlanError, match=r"unknown schedule 'zigzag'.*or @FILE"):
        canonical_schedule("zigzag")
