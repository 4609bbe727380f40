"""A rank's layout from a plan: the plan's cuts in the plan's node order, nothing costed."""

from __future__ import annotations

import functools

import pytest

import partition.planning.analysis
from partition import plan_model
from partition.devices import parse_devices
from partition.errors import PlanError
from partition.models import examples
from partition.models.registry import build_meta_model
from pipeline.runtime.layout import layout
from pipeline.runtime.pipeline import PipelineOptions


@pytest.mark.parametrize(("order", "method"), [("graph", "fx"), ("late", "fx"), ("auto", "export")])
def test_a_rank_given_a_plan_cuts_without_costing(
    monkeypatch: pytest.MonkeyPatch, order: str, method: str
) -> None:
    built = build_meta_model(functools.partial(examples.gpt, "toy", batch=4))
    plan = plan_model(
        built.model,
        built.args,
        devices=parse_devices("cpu", 3),
        microbatches=2,
        order=order,
        method=method,
    )
    planned = [
        (s.index, s.first_node, s.last_node) for s in plan.stages
    ]  # what the plan file says each stage runs

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a rank given a plan costed the model")

    monkeypatch.setattr(partition.planning.analysis, "cost_model", refuse)
    stages, schedule = layout(built, plan, PipelineOptions(), 3)
    assert [(i, s.nodes[0], s.nodes[-1]) for i, s in enumerate(stages)] == planned
    assert schedule.num_microbatches == 2 and schedule.name == plan.schedule


def test_a_plan_in_an_unknown_order_is_refused() -> None:
    built = build_meta_model(functools.partial(examples.gpt, "toy", batch=4))
    plan = plan_model(built.model, built.args, devices=parse_devices("cpu", 2), microbatches=2)
    bad = plan.__class__.from_dict(
        {**plan.to_dict(), "model": {**plan.to_dict()["model"], "order": "auto"}}
    )
    with pytest.raises(PlanError, match="node order is 'graph' or 'late'"):
        layout(built, bad, PipelineOptions(), 2)
