"""``--schedule @FILE`` end to end: a schedule a user writes is planned, simulated, run and
checked against one process like a built-in one, and a plan made from it needs the file no
more; see [Note: a schedule a user writes]."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from partition.schedules.actions import build_schedule
from pipeline.cli.command import main

# 1F1B on 2 ranks with 4 micro-batches, but rank 0 warms up with 2 forwards instead of 1
WARM2 = "0F0 0F1 0F2 0B0 0F3 0B1 0B2 0B3\n1F0 1B0 1F1 1B1 1F2 1B2 1F3 1B3\n"
RUN = ["run", "gpt", "--size", "toy", "--ranks", "2", "--steps", "2", "--timeout", "60"]


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:  # type: ignore[type-arg]
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def _computed(data: dict) -> list[str]:  # type: ignore[type-arg]
    """Each rank's computations (F, B, I, W) in the order it ran them, from a run's timeline."""
    ranks = sorted({e[0] for e in data["timeline"]})
    return [
        " ".join(
            a
            for _, a, _, _ in sorted((e for e in data["timeline"] if e[0] == r), key=lambda e: e[2])
            if a.lstrip("0123456789")[0] in "FBIW"
        )
        for r in ranks
    ]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_built_schedule_from_a_file_trains_as_the_built_one(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "1f1b.txt"
    path.write_text(build_schedule("1f1b", 2, 4).to_text() + "\n")
    built = _json(capsys, [*RUN, "--schedule", "1f1b", "--check"])
    written = _json(capsys, [*RUN, "--schedule", f"@{path}", "--check"])
    assert written["check"]["passed"] and built["check"]["passed"]  # each equals one process
    assert [s["loss"] for s in written["steps"]] == [s["loss"] for s in built["steps"]]
    assert _computed(written) == _computed(built)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_hand_written_schedule_is_priced_run_and_saved_in_its_plan(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "warm2.txt"
    path.write_text(WARM2)
    flags = ["gpt", "--size", "toy", "--devices", "2", "--schedule", f"@{path}"]
    simulated = _json(capsys, ["simulate", *flags, "--microbatches", "4"])
    assert simulated["peak_activation_microbatches"] == [3, 1]  # rank 0 holds one more
    plan_file = tmp_path / "plan.json"
    planned = _json(capsys, ["plan", *flags, "--microbatches", "4", "--out", str(plan_file)])
    assert planned["schedule"] == WARM2.strip() and planned["step_time"] > 0
    assert [s["inflight"] for s in planned["stages"]] == [3, 1]
    path.unlink()  # the plan holds the schedule's text: show, simulate and run need no file
    assert main(["show", str(plan_file)]) == 0
    assert "custom (2 ranks) · 4 micro-batches" in capsys.readouterr().out
    assert _json(capsys, ["simulate", str(plan_file)])["step_time"] > 0
    ran = _json(capsys, [*RUN, "--plan", str(plan_file), "--check"])
    assert ran["check"]["passed"]
    assert _computed(ran) == WARM2.strip().split("\n")


def test_a_bad_schedule_file_is_refused_before_anything_runs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit, match="2"):  # argparse's: a bad --schedule value
        main([*RUN, "--schedule", f"@{tmp_path / 'missing.txt'}"])
    assert "cannot read the schedule file" in capsys.readouterr().err
    path = tmp_path / "warm2.txt"
    path.write_text(WARM2)
    assert main([*RUN, "--schedule", f"@{path}", "--microbatches", "2"]) != 0
    err = capsys.readouterr().err
    assert "runs micro-batches 0..3 (4) but the run has 2; use --microbatches 4" in err
    path.write_text("0F0 0B0 0F1 0B1\n1F1 1F0 1B0 1B1\n")
    assert main([*RUN, "--schedule", f"@{path}", "--microbatches", "2"]) != 0
    assert "[rank 0 · step 1 · 0B0] deadlock" in capsys.readouterr().err
