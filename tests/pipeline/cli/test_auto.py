"""`pipeline.cli.auto`: ``plan --auto``, ``--schedule auto`` and ``--objective`` — the ``--json``
object (a public contract), the table ``plan`` and ``show`` print, and what is refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from partition.plan import Plan
from partition.schedules.names import SCHEDULE_NAMES
from pipeline.cli.command import main

SLOW = "mem=16GiB,tflops=0.001,bw=1TB/s,lat=0"  # compute dominates the toy: devices help
AUTO = {"objective", "global_batch", "chosen", "runner_ups", "searched", "skipped"}
CANDIDATE = {"config", "step_time", "peak_memory", "throughput"}
CONFIG = {"schedule", "microbatches", "virtual", "devices", "recompute"}


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> Any:
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1, "--json prints exactly one line"
    return json.loads(out)


def test_auto_json_names_the_choice_and_its_runner_ups(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "auto.json"
    argv = ["plan", "gpt", "--size", "toy", "--device-spec", SLOW, "--auto", "--max-devices", "3"]
    data = _json(capsys, [*argv, "--global-batch", "8", "--out", str(path), "--json"])
    auto = data["auto"]
    assert set(auto) == AUTO and auto["objective"] == "step" and auto["global_batch"] == 8
    for c in (auto["chosen"], *auto["runner_ups"]):
        assert set(c) == CANDIDATE and set(c["config"]) == CONFIG
    chosen = auto["chosen"]["config"]
    assert data["schedule"] == chosen["schedule"] and data["microbatches"] == chosen["microbatches"]
    assert len(data["devices"]) == chosen["devices"] <= 3
    assert data["step_time"] == auto["chosen"]["step_time"]
    steps = [c["step_time"] for c in auto["runner_ups"]]
    assert 1 <= len(steps) <= 5 and steps == sorted(steps)
    assert data["objective"]["minimised"] == "step"  # --auto prices each split by its step
    assert Plan.load(path).auto is not None
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "--auto:" in out and "chosen" in out and "#2" in out


def test_schedule_auto_picks_the_schedule_alone(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "gpt", "--size", "toy", "--device-spec", SLOW, "--devices", "2"]
    data = _json(capsys, [*argv, "--schedule", "auto", "--microbatches", "4", "--json"])
    auto = data["auto"]
    configs = [c["config"] for c in (auto["chosen"], *auto["runner_ups"])]
    assert {(c["devices"], c["microbatches"], c["recompute"]) for c in configs} == {(2, 4, False)}
    assert {c["schedule"] for c in configs} <= set(SCHEDULE_NAMES)
    assert len({c["schedule"] for c in configs}) > 1


def test_objective_flag_and_what_auto_refuses(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["plan", "gpt", "--size", "toy", "--devices", "2"]
    data = _json(capsys, [*base, "--objective", "step", "--json"])
    assert data["objective"]["minimised"] == "step" and "auto" not in data
    assert _json(capsys, [*base, "--json"])["objective"]["minimised"] == "bottleneck"
    assert main([*base, "--max-devices", "4"]) == 2
    assert "--max-devices needs --auto" in capsys.readouterr().err
    assert main([*base, "--auto", "--max-devices", "4"]) == 2
    assert "not both" in capsys.readouterr().err
    tiny = ["plan", "gpt", "--size", "toy", "--device-spec", "mem=120KiB,tflops=1"]
    assert main([*tiny, "--auto", "--max-devices", "2"]) == 2
    assert "fewest devices that fit is" in capsys.readouterr().err
