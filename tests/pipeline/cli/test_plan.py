"""`pipeline.cli.plan`: ``plan``, ``show`` and ``simulate`` — the ``--json`` objects (a public
contract), the tables, and a saved plan re-priced on other devices."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from partition.plan import Plan
from pipeline.cli.command import main
from pipeline.cli.plan import plan_summary, plan_table

HEADLINE = {
    "bottleneck",
    "bottleneck_stage",
    "step_time",
    "bubble",
    "fits",
    "idle_stages",
    "devices_note",
    "bubble_note",
}
SIMULATE_KEYS = {
    "schedule",
    "microbatches",
    "ranks",
    "step_time",
    "bubble",
    "busy_time",
    "peak_activation_microbatches",
    "peak_activation_bytes",
    "bottleneck",
    "png",
}


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> Any:
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1, "--json prints exactly one line"
    return json.loads(out)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-stage GPT plan on cpu devices, 4 micro-batches, 1F1B."""
    path = tmp_path_factory.mktemp("plan") / "p.json"
    assert main(["plan", "gpt", "--devices", "2", "--out", str(path), "--json"]) == 0
    return path


def test_plan_summary_is_the_plan_file_and_the_headline(saved: Path) -> None:
    plan = Plan.load(saved)
    summary = plan_summary(plan)
    assert set(summary) == set(plan.to_dict()) | HEADLINE
    assert {k: summary[k] for k in plan.to_dict()} == plan.to_dict()
    assert summary["bottleneck"] == plan.bottleneck == max(s.time for s in plan.stages)
    assert summary["bottleneck_stage"] == plan.bottleneck_stage
    assert (summary["step_time"], summary["bubble"]) == (plan.step_time, plan.bubble)
    assert summary["fits"] is plan.fits() is True
    json.dumps(summary)  # strict JSON: nothing a script cannot read


def test_plan_json_and_show_json_agree(capsys: pytest.CaptureFixture[str], saved: Path) -> None:
    """The plan file's text round trip: ``show`` prints what ``plan`` printed."""
    planned = _json(capsys, ["plan", "gpt", "--devices", "2", "--json"])
    shown = _json(capsys, ["show", str(saved), "--json"])
    assert shown == planned == plan_summary(Plan.load(saved))


def _text(table: Any) -> str:
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text()


def test_plan_table_has_a_row_per_stage_and_the_prediction(saved: Path) -> None:
    plan = Plan.load(saved)
    text = _text(plan_table(plan))
    assert "GPT · 1f1b · 4 micro-batches · optimal" in text
    rows = [line for line in text.splitlines() if line.startswith("│")]
    assert [row.split("│")[1].strip() for row in rows] == ["0", "1"]
    assert [row.split("│")[2].strip() for row in rows] == ["cpu:0", "cpu:1"]
    assert "predicted step" in text and "bottleneck stage" in text
    assert "✗" not in text and "does not fit memory" not in text
    assert "my title" in _text(plan_table(plan, title="my title"))


def test_a_plan_whose_devices_cannot_help_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 18 item 9: the toy GPT over 4 cpu devices leaves 3 stages idle (every inner stage
    pays two links, more than the whole model's compute); the table and --json say so."""
    summary = _json(capsys, ["plan", "gpt", "--devices", "4", "--json"])
    assert summary["idle_stages"] == [0, 1, 2]
    assert summary["devices_note"].startswith("3 of 4 stages are idle")
    assert "runs faster on 1 device" in summary["devices_note"]
    assert main(["plan", "gpt", "--devices", "4"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "3 of 4 stages are idle" in text and "plan with --devices 1" in text


def test_a_plan_that_does_not_fit_is_marked(
    capsys: pytest.CaptureFixture[str], saved: Path
) -> None:
    argv = ["show", str(saved), "--device-spec", "mem=1KiB,tflops=1"]
    assert _json(capsys, [*argv, "--json"])["fits"] is False  # show prices, it does not refuse
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("✗") == 2 and "does not fit memory" in " ".join(out.split())


def test_show_reprices_on_one_spec_or_one_per_rank(
    capsys: pytest.CaptureFixture[str], saved: Path
) -> None:
    base = _json(capsys, ["show", str(saved), "--json"])
    h100 = _json(capsys, ["show", str(saved), "--device-spec", "h100", "--json"])
    assert [s["device"]["name"] for s in h100["stages"]] == ["h100:0", "h100:1"]
    assert h100["bottleneck"] < base["bottleneck"]  # faster devices, same split
    assert [s["nodes"] for s in h100["stages"]] == [s["nodes"] for s in base["stages"]]
    mixed = _json(capsys, ["show", str(saved), "--device-spec", "h100;a100-40", "--json"])
    assert [s["device"]["name"] for s in mixed["stages"]] == ["h100", "a100-40"]
    assert main(["show", str(saved), "--device-spec", "h100;a100-40;cpu"]) == 2
    assert "the plan has 2 ranks but 3 devices were given" in capsys.readouterr().err


def test_simulate_json_is_the_documented_object(
    capsys: pytest.CaptureFixture[str], saved: Path
) -> None:
    data = _json(capsys, ["simulate", str(saved), "--json"])
    assert set(data) == SIMULATE_KEYS
    assert (data["schedule"], data["microbatches"], data["ranks"]) == ("1f1b", 4, 2)
    assert data["bottleneck"] == Plan.load(saved).bottleneck and data["png"] is None
    assert len(data["busy_time"]) == 2 and 0 < data["bubble"] < 1
    assert max(data["busy_time"]) <= data["step_time"]
    assert data["peak_activation_microbatches"] == [2, 1]  # 1F1B: ranks - stage


def test_simulate_flags_override_the_saved_plan(
    capsys: pytest.CaptureFixture[str], saved: Path
) -> None:
    same = _json(capsys, ["simulate", str(saved), "--json"])
    more = _json(capsys, ["simulate", str(saved), "--microbatches", "8", "--json"])
    assert (more["schedule"], more["microbatches"]) == ("1f1b", 8)  # the plan's schedule
    assert more["step_time"] > same["step_time"] and more["bubble"] < same["bubble"]
    gpipe = _json(capsys, ["simulate", str(saved), "--schedule", "gpipe", "--json"])
    assert gpipe["peak_activation_microbatches"] == [4, 4]
    slow = _json(
        capsys, ["simulate", str(saved), "--device-spec", "mem=1GiB,tflops=0.01", "--json"]
    )
    assert slow["step_time"] > same["step_time"]  # re-priced on slower devices


def test_simulate_table_has_a_row_per_rank(capsys: pytest.CaptureFixture[str], saved: Path) -> None:
    assert main(["simulate", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "GPT · 1f1b · 4 micro-batches (simulated)" in out
    rows = [line.split("│") for line in out.splitlines() if line.startswith("│")]
    assert [(r[1].strip(), r[4].strip(), r[5].strip()) for r in rows] == [
        ("0", "0", "2"),
        ("1", "1", "1"),
    ]
    assert "bubble" in out and "Gantt" not in out


def test_plan_says_which_modes_it_traced_and_takes_modes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A model whose forward reads ``self.training``: both modes by default, one with ``--modes``
    (the factory puts the model in eval mode; see `tests.pipeline.test_layout`)."""
    model = "tests.pipeline.test_layout:_eval_factory"
    assert main(["plan", model, "--devices", "2", "--microbatches", "2"]) == 0
    out = capsys.readouterr().out
    assert "modes: eval and train traced (the forward reads self.training)" in out
    data = _json(
        capsys,
        ["plan", model, "--devices", "2", "--microbatches", "2", "--modes", "eval", "--json"],
    )
    assert data["model"]["modes"] == ["eval"]
    assert Plan.from_dict(data).model.modes == ("eval",)
    assert main(["plan", model, "--devices", "2", "--microbatches", "2", "--modes", "eval"]) == 0
    assert (
        "modes: eval only (--modes eval); the pipeline refuses train mode"
        in capsys.readouterr().out
    )
    assert main(["plan", model, "--devices", "2", "--modes", "train"]) == 2
    assert (
        "modes='train' traces train mode only, but the model is in eval mode"
        in capsys.readouterr().err
    )


def test_plan_dp_prints_memory_per_device_under_ddp_and_fsdp(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Issue 19: ``plan --dp D`` says what each device holds with D replicas, both ways."""
    out = _json(capsys, ["plan", "gpt", "--devices", "2", "--dp", "4", "--json"])
    replicas = out["replicas"]
    assert replicas["dp"] == 4 and len(replicas["ddp"]) == len(replicas["fsdp"]) == 2
    totals = [s["memory"]["total"] for s in out["stages"]]
    assert all(d > t for d, t in zip(replicas["ddp"], totals, strict=True))  # + the reduced copy
    assert replicas["ranks"] == [[0, 2, 4, 6], [1, 3, 5, 7]]  # replica r's stage s: r * 2 + s
    # the all-reduce of each stage's gradients, and what of it the backward does not hide
    reduce = replicas["reduce"]
    bytes_, (bw, lat) = [s["param_bytes"] for s in out["stages"]], (10e9, 50e-6)  # cpu preset
    want = [2 * 3 / 4 * b / bw + 6 * lat if b else 0.0 for b in bytes_]  # one bucket each
    assert reduce["stage_time"] == pytest.approx(want) and reduce["when"] == "stage"
    assert reduce["step_time"] == pytest.approx(out["step_time"] + reduce["exposed"])
    assert main(["plan", "gpt", "--devices", "2", "--dp", "4"]) == 0
    text = capsys.readouterr().out
    assert "memory per device with 4 replicas of the pipeline (8 devices)" in text
    assert "fsdp" in text and "ddp" in text and "reduce" in text


def test_a_spec_with_fixed_costs_predicts_a_toy_gpt_step_in_milliseconds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # issue 20: without fixed costs the toy GPT's 2-stage step was predicted at ~0.3 ms, 125x
    # faster than measured; about 60 ops per stage at 12 us each make every action ~1 ms.
    argv = ["plan", "gpt", "--size", "toy", "--devices", "2", "--json"]
    plain = _json(capsys, [*argv, "--device-spec", "cpu"])
    fixed = _json(capsys, [*argv, "--device-spec", "cpu,fwd=3us,bwd=9us,action=15us"])
    assert plain["step_time"] < 1e-3 < fixed["step_time"] < 1e-2
