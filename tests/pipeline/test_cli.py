"""The pipepart command: tables, one JSON object with --json, clear one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:  # type: ignore[type-arg]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1, "--json prints exactly one line"
    return json.loads(out)  # type: ignore[no-any-return]


def test_plan_json_has_the_bottleneck(capsys: pytest.CaptureFixture[str]) -> None:
    data = _json(capsys, ["plan", "gpt", "--devices", "3", "--microbatches", "4", "--json"])
    assert data["bottleneck"] == max(s["time"] for s in data["stages"])
    assert data["bottleneck_stage"] in range(3) and len(data["stages"]) == 3
    assert data["algorithm"] == "optimal" and data["fits"] is True
    assert 0 < data["bubble"] < 1 and data["step_time"] > 0


def test_plan_table_and_out_then_show(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    assert main(["plan", "gpt", "--devices", "2", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    for word in ("stage", "GFLOPs", "memory / capacity", "predicted step", "bubble", "bottleneck"):
        assert word in table
    shown = _json(capsys, ["show", str(out), "--json"])
    assert shown["bottleneck"] == json.loads(out.read_text())["objective"]["bottleneck"]
    slower = _json(capsys, ["show", str(out), "--device-spec", "mem=1GiB,tflops=0.001", "--json"])
    assert slower["bottleneck"] > shown["bottleneck"]
    assert [s["nodes"] for s in slower["stages"]] == [s["nodes"] for s in shown["stages"]]


@pytest.mark.parametrize("algorithm", ["uniform", "params", "time"])
def test_baselines_are_never_better_than_optimal(
    capsys: pytest.CaptureFixture[str], algorithm: str
) -> None:
    argv = [
        "plan",
        "gpt",
        "--devices",
        "3",
        "--json",
        "--device-spec",
        "mem=16GiB,tflops=1,bw=1GB/s",
    ]
    optimal = _json(capsys, argv)
    baseline = _json(capsys, [*argv, "--algorithm", algorithm])
    assert baseline["algorithm"] == algorithm
    assert optimal["bottleneck"] <= baseline["bottleneck"] * (1 + 1e-12)


def test_heterogeneous_devices(capsys: pytest.CaptureFixture[str]) -> None:
    data = _json(capsys, ["plan", "gpt", "--device-spec", "h100;a100-40;cpu", "--json"])
    assert [s["device"]["name"] for s in data["stages"]] == ["h100", "a100-40", "cpu"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plan", "nosuchmodel"], "unknown model 'nosuchmodel'"),
        (["plan", "gpt", "--device-spec", "tpu9"], "unknown device preset"),
        (
            ["plan", "gpt", "--batch", "7", "--microbatches", "4"],
            "batch 7 is not divisible by 4 micro-batches",
        ),
        (["plan", "gpt", "--device-spec", "mem=64KiB,tflops=1", "--devices", "2"], "fit"),
        (["show", "missing.json"], "no plan file"),
    ],
)
def test_errors_are_one_line_and_non_zero(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_every_subcommand_has_help_with_an_example() -> None:
    for command in ("plan", "show", "simulate", "run", "bench"):
        out = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", command, "--help"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "examples:" in out and f"pipepart {command}" in out


def test_simulate_a_saved_plan_and_draw_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    plan = tmp_path / "p.json"
    assert (
        main(["plan", "gpt", "--devices", "4", "--microbatches", "8", "--out", str(plan), "--json"])
        == 0
    )
    capsys.readouterr()
    png = tmp_path / "gantt.png"
    same = _json(capsys, ["simulate", str(plan), "--png", str(png), "--json"])
    assert same["microbatches"] == 8 and same["schedule"] == "1f1b"
    assert same["step_time"] == pytest.approx(
        json.loads(plan.read_text())["predicted"]["step_time"]
    )
    assert png.stat().st_size > 10_000
    gpipe = _json(capsys, ["simulate", str(plan), "--schedule", "gpipe", "--json"])
    assert gpipe["peak_activation_microbatches"] == [8, 8, 8, 8]
    assert same["peak_activation_microbatches"] == [4, 3, 2, 1]


def test_simulate_a_model_directly(capsys: pytest.CaptureFixture[str]) -> None:
    data = _json(
        capsys,
        [
            "simulate",
            "gpt",
            "--devices",
            "2",
            "--schedule",
            "interleaved",
            "--virtual",
            "2",
            "--json",
        ],
    )
    assert data["ranks"] == 2 and len(data["peak_activation_microbatches"]) == 4


def test_bench_lists_and_runs_with_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "list"]) == 0
    listed = capsys.readouterr().out
    assert "trace_cost" in listed and "partitioners" in listed
    data = _json(capsys, ["bench", "trace_cost", "--quick", "--json"])
    assert data["rows"][0]["blocks"] == 12
    assert main(["bench", "nope"]) == 2


@pytest.mark.timeout(240)
def test_run_json_reports_steps_and_check(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    png = tmp_path / "run.png"
    argv = [
        "run",
        "gpt",
        "--ranks",
        "2",
        "--steps",
        "2",
        "--check",
        "--json",
        "--timeout",
        "60",
        "--png",
        str(png),
    ]
    data = _json(capsys, argv)
    assert [s["step"] for s in data["steps"]] == [0, 1]
    assert all(s["time"] > 0 and s["loss"] > 0 for s in data["steps"])
    assert (
        data["check"]["loss"] < 1e-5
        and data["check"]["grads"] < 1e-5
        and data["check"]["params"] < 1e-5
    )
    assert png.stat().st_size > 10_000


def test_run_bad_batch_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "gpt", "--ranks", "2", "--batch", "7", "--timeout", "60"]) == 2
    err = capsys.readouterr().err.strip()
    assert "batch 7 is not divisible by 4 micro-batches" in err and "\n" not in err
