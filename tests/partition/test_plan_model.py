"""The front door of planning: `plan_model` is `analyze` then `plan_analysis`, with its options."""

from __future__ import annotations

import pytest

from partition import analyze, plan_model
from partition.devices import parse_devices
from partition.errors import PlanError
from partition.models.examples import skipnet
from partition.options import PlanOptions
from partition.planning.model import plan_analysis


def test_planning_a_model_is_analysing_it_then_planning_the_analysis() -> None:
    model, inputs, _ = skipnet(batch=8)
    devices = parse_devices("cpu", 3)
    lines: list[str] = []
    plan = plan_model(model, inputs, devices=devices, microbatches=4, progress=lines.append)
    analysis = analyze(model, inputs, microbatches=4)
    assert plan == plan_analysis(analysis, devices)  # the analysis' micro-batches by default
    assert lines == ["tracing SkipNet", f"costing {len(analysis.traced.graph.nodes)} nodes",
                     f"partitioning {len(analysis.graph)} nodes over 3 devices"]  # fmt: skip


def test_knobs_apply_over_the_options() -> None:
    model, inputs, _ = skipnet(batch=8)
    devices = parse_devices("cpu", 2)
    options = PlanOptions(schedule="gpipe", microbatches=2)
    plan = plan_model(model, inputs, devices=devices, options=options, algorithm="uniform")
    assert (plan.schedule, plan.microbatches, plan.algorithm) == ("gpipe", 2, "uniform")
    analysis = analyze(model, inputs, microbatches=2)
    again = plan_analysis(analysis, devices, options, algorithm="uniform")
    assert again == plan
    with pytest.raises(TypeError, match="unknown planning option"):
        plan_model(model, inputs, devices=devices, micro_batches=2)


def test_no_devices_is_refused_before_tracing() -> None:
    model, inputs, _ = skipnet(batch=8)
    with pytest.raises(PlanError, match="no devices given"):
        plan_model(model, inputs, devices=[], progress=lambda line: pytest.fail(line))
