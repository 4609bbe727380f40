"""The plan file: JSON round trip, validation, and refusing a plan made for another model."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from partition import analyze, plan_analysis, plan_model, reprice
from partition.devices import parse_devices
from partition.errors import InputError, PlanError
from partition.memory import MemoryModel
from partition.models.examples import gpt, skipnet
from partition.plan import SUMMARY_FIELDS, Plan
from partition.planning.analysis import stages_for_plan


def _plan(**kw: object) -> Plan:
    model, inputs, _ = gpt("toy", batch=8)
    options = dict(devices=parse_devices("cpu", 3), schedule="1f1b", microbatches=4)
    options.update(kw)
    return plan_model(model, inputs, **options)  # type: ignore[arg-type]


def test_round_trip_is_exact(tmp_path: Path) -> None:
    plan = _plan()
    path = plan.save(tmp_path / "plan.json")
    again = Plan.load(path)
    assert again == plan
    assert again.to_json() == plan.to_json()
    data = json.loads(path.read_text())
    assert data["schema_version"] == 1
    assert data["model"]["class_name"] == "GPT"
    assert data["objective"]["bottleneck"] == plan.bottleneck
    assert [s["nodes"]["start"] for s in data["stages"]] == list(plan.bounds[:-1])
    assert all(
        {"weights", "gradients", "optimizer", "activations", "buffers", "total"} <= set(s["memory"])
        for s in data["stages"]
    )
    assert data["stages"][0]["outputs"] and data["stages"][0]["send_bytes"] > 0


def test_plan_numbers_are_consistent() -> None:
    plan = _plan()
    assert plan.bottleneck == max(s.time for s in plan.stages)
    assert plan.perfect_balance <= plan.bottleneck
    m, p = plan.microbatches, plan.num_ranks
    busy = [m * s.compute_time for s in plan.stages]  # every micro-batch's F and B, per rank
    # the prediction is one simulated step: at least the busiest rank's work, at most the
    # slowest stage's time for each of the m + p - 1 slots of 1F1B, and the bubble its idle share
    assert max(busy) <= plan.step_time <= (m + p - 1) * plan.bottleneck
    assert plan.bubble == pytest.approx(1 - sum(busy) / (p * plan.step_time), rel=1e-12)
    assert 0 < plan.bubble < 1
    assert plan.model.inputs[0].shape == (2, 16)  # a micro-batch: 8 rows in 4 micro-batches


def test_tied_weights_are_listed() -> None:
    model, inputs, _ = gpt("toy", batch=4, tie_weights=True)
    plan = plan_model(model, inputs, devices=parse_devices("cpu", 2), microbatches=2)
    assert plan.shared_params == {"wte.weight": [0, 1]}


@pytest.mark.slow
def test_a_plan_counts_parameters_as_the_model_does_and_prices_buffers_once() -> None:
    """Issue 18 item 3: BatchNorm's buffers were counted as parameters (a plan of 131,212
    "parameters" for a model of 126,822) and priced with gradients and optimizer state."""
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        model = torchvision.models.resnet18(num_classes=10)
    x = torch.empty(4, 3, 32, 32, device="meta")
    sgd = MemoryModel(optimizer="sgd")  # weights + gradients: no optimizer state
    analysis = analyze(model, (x,), microbatches=2)
    plan = plan_analysis(analysis, parse_devices("cpu", 2), microbatches=2, memory=sgd)
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert buffers > 0 and plan.model.num_parameters == params
    assert plan.model.param_bytes == 4 * params == sum(s.param_bytes for s in plan.stages)
    weights = sum(s.memory["weights"] for s in plan.stages)
    assert weights == plan.model.param_bytes + buffers  # buffers take memory...
    assert sum(s.memory["gradients"] for s in plan.stages) == plan.model.param_bytes  # ...once
    assert all(s.memory["optimizer"] == 0 for s in plan.stages)
    old = plan.to_dict()  # a plan file written before: buffers counted; it loads and applies
    old["model"]["num_parameters"] += sum(b.numel() for b in model.buffers())
    assert len(stages_for_plan(analysis.traced, Plan.from_dict(old))) == 2


def test_plan_for_another_model_is_refused() -> None:
    plan = _plan()
    model, inputs, _ = gpt("toy", batch=8, layers=3)
    analysis = analyze(model, inputs, microbatches=4)
    with pytest.raises(
        PlanError, match="this plan was made for another model: GPT with 16,480 parameters"
    ):
        stages_for_plan(analysis.traced, plan)
    model, inputs, _ = gpt("toy", batch=8)
    assert len(stages_for_plan(analyze(model, inputs, microbatches=4).traced, plan)) == 3


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(schema_version=99), "schema version"),
        (lambda d: d["stages"][1]["nodes"].update(start=0), "contiguous"),
        (lambda d: d.pop("stages"), "malformed"),
        (lambda d: d.update(schedule="dualpipe"), "unknown schedule"),
    ],
)
def test_damaged_plans_are_rejected(tmp_path: Path, edit: object, message: str) -> None:
    data = _plan().to_dict()
    edit(data)  # type: ignore[operator]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match=message):
        Plan.load(tmp_path / "bad.json")


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="no plan file"):
        Plan.load(tmp_path / "nope.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(tmp_path / "junk.json")


def test_batch_must_divide_into_microbatches() -> None:
    model, inputs, _ = skipnet(batch=7)
    with pytest.raises(InputError, match="batch 7 is not divisible by 4 micro-batches"):
        plan_model(model, inputs, devices=parse_devices("cpu", 2), microbatches=4)


def test_reprice_on_the_same_devices_changes_nothing_and_slower_devices_are_slower() -> None:
    plan = _plan()
    same = reprice(plan, plan.devices)
    assert same.bottleneck == pytest.approx(plan.bottleneck, rel=1e-12)
    assert same.step_time == pytest.approx(plan.step_time, rel=1e-12)
    slow = reprice(plan, parse_devices("mem=16GiB,tflops=0.01", 3))
    assert slow.bottleneck > plan.bottleneck and slow.bounds == plan.bounds


def test_meta_model_plans_at_real_size() -> None:
    with torch.device("meta"):
        model, inputs, _ = gpt("1b", batch=8, seq=512)
    plan = plan_model(model, inputs, devices=parse_devices("a100-40", 4), microbatches=8)
    assert plan.fits() and plan.model.num_parameters > 1e9


def test_the_json_plan_prints_loads_back_and_an_edited_summary_is_refused(tmp_path: Path) -> None:
    """Issue 18, item 3: ``pipepart plan --json``'s output was refused by ``--plan`` (unknown
    field 'bottleneck'): one JSON a user saves loads back, its summary checked against it."""
    from pipeline.cli import main

    out = tmp_path / "printed.json"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(["plan", "gpt", "--size", "toy", "--devices", "2", "--json"]) == 0
    out.write_text(printed.getvalue())
    plan = Plan.load(out)
    data = json.loads(printed.getvalue())
    assert plan.to_dict() == {k: v for k, v in data.items() if k not in SUMMARY_FIELDS}
    data["bubble"] = 0.0
    out.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=r"'bubble' says 0\.0, but its stages give"):
        Plan.load(out)
