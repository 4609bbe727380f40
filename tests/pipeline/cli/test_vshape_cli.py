"""``--schedule zb-v`` and ``--schedule dualpipev`` on the command line, without ``--virtual``:
planned on the V placement, simulated, and run (checked against one process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from partition.schedules.actions import Kind, build_schedule
from pipeline.cli.command import main


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:  # type: ignore[type-arg]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


@pytest.mark.parametrize("schedule", ["zb-v", "dualpipev"])
def test_plan_show_and_simulate_place_the_v(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, schedule: str
) -> None:
    out = tmp_path / "plan.json"
    argv = ["plan", "gpt", "--devices", "2", "--microbatches", "4", "--schedule", schedule]
    plan = _json(capsys, [*argv, "--json", "--out", str(out)])
    assert (plan["schedule"], plan["virtual"]) == (schedule, 2)
    assert [s["device"]["name"] for s in plan["stages"]] == ["cpu:0", "cpu:1", "cpu:1", "cpu:0"]
    assert [s["inflight"] for s in plan["stages"]] == [4, 3, 2, 1]
    assert plan["step_time"] > 0
    assert main(["simulate", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "0, 3" in shown and "1, 2" in shown  # rank 0 holds stages 0 and 3, rank 1 1 and 2
    simulated = _json(capsys, ["simulate", str(out), "--json"])
    assert simulated["peak_activation_microbatches"] == [4, 3, 2, 1]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_run_dualpipev_matches_one_process(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", "gpt", "--ranks", "2", "--steps", "1", "--microbatches", "4", "--check"]
    data = _json(capsys, [*argv, "--schedule", "dualpipev", "--timeout", "60", "--json"])
    assert data["stages"] == {"0": [0, 3], "1": [1, 2]}
    ran = [
        [a for r, a, *_ in sorted(data["timeline"], key=lambda e: e[2]) if r == rank]
        for rank in (0, 1)
    ]
    computes = [[a for a in row if a.lstrip("0123456789")[0] in "FBIW"] for row in ran]
    planned = build_schedule("dualpipev", 2, 4).actions
    assert computes == [[str(a) for a in row] for row in planned]
    sends = [a for row in ran for a in row if a.lstrip("0123456789")[:2] in ("SF", "SB")]
    assert len(sends) == 2 * 4 * 2  # cuts 0|1 and 2|3, each way, 4 micro-batches; none at 1|2
    assert all(not (a.startswith("1SF") or a.startswith("2SB")) for a in sends)
    assert data["check"]["loss"] < 1e-5 and data["check"]["grads"] < 1e-5
    assert Kind.B.value in "".join(computes[0])  # its overlapped pairs' full backwards ran
