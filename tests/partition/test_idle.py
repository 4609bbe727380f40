"""Idle stages: the plan names them and says when fewer devices run the model as fast
([Note: idle stages] in `partition.idle`); the partitioner takes the fewest of them."""

from __future__ import annotations

import json

import pytest
import torch

from partition import analyze, plan_analysis, plan_model
from partition.devices import parse_devices
from partition.errors import PlanError
from partition.examples import gpt
from partition.idle import devices_note, idle_stages
from partition.plan import Plan
from partition.planning.analysis import Analysis


@pytest.fixture(scope="module")
def toy() -> Analysis:
    model, inputs, _ = gpt("toy", batch=8)
    return analyze(model, inputs, microbatches=4)


def _toy(analysis: Analysis, spec: str, devices: int) -> Plan:
    return plan_analysis(analysis, parse_devices(spec, devices))


def test_idle_stages_are_named_and_fewer_devices_are_priced(toy: Analysis) -> None:
    four = _toy(toy, "cpu", 4)  # links cost more than the toy's whole compute: no split helps
    assert idle_stages(four) == [0, 1, 2]
    note = devices_note(four)
    assert note is not None and note.startswith("3 of 4 stages are idle (stages 0, 1, 2")
    alone = sum(s.compute_time for s in four.stages)
    assert f"runs faster on 1 device ({alone * 1e6:.3g} µs per micro-batch" in note
    two = _toy(toy, "cpu", 2)  # no stage idle, and still slower than one device
    assert idle_stages(two) == []
    assert (devices_note(two) or "").startswith("all 2 stages have work: this model runs faster")
    slow = _toy(toy, "mem=16GiB,tflops=0.001,bw=1TB/s,lat=0", 2)  # compute dominates: 2 help
    assert idle_stages(slow) == [] and devices_note(slow) is None


def test_the_summary_carries_them_and_an_edited_one_is_refused(toy: Analysis) -> None:
    plan = _toy(toy, "cpu", 4)
    data = {**plan.to_dict(), **plan.summary()}
    assert data["idle_stages"] == [0, 1, 2] and data["devices_note"] == devices_note(plan)
    assert Plan.from_dict(json.loads(json.dumps(data))) == plan
    with pytest.raises(PlanError, match="'idle_stages' says"):
        Plan.from_dict({**data, "idle_stages": [0]})


def test_a_bottleneck_one_node_sets_leaves_no_stage_idle() -> None:
    """GPT-2 small over 8 A100s: the LM head sets the bottleneck; the stages before it had the
    input, ``size``, ``getattr`` and ``arange`` to themselves (4 of 8 idle). Now every stage has
    work, with the same bottleneck."""
    with torch.device("meta"):
        model, inputs, _ = gpt("small", batch=8)
    plan = plan_model(model, inputs, devices=parse_devices("a100-40", 8), microbatches=8)
    assert idle_stages(plan) == [] and devices_note(plan) is None
    assert plan.bottleneck_stage == 7 and plan.stages[7].first_module == "lm_head"
