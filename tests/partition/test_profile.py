"""Measured node times: every compute node timed, big matmuls slower than reshapes, plans use them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from partition import analyze, plan_model
from partition.devices import PRESETS, parse_devices
from partition.graph import linearize
from partition.models.examples import gpt
from partition.profile import profile


def test_every_compute_node_is_timed_and_costs_follow_the_times() -> None:
    model, inputs, _ = gpt("toy", batch=4, seq=16)
    analysis = analyze(model, inputs)
    here = dataclasses.replace(PRESETS["cpu"], flops=3e12)  # what this machine is said to be
    timed = profile(analysis.costs, here, repeats=2)
    compute = [n for n in analysis.traced.graph.nodes if n.op.startswith("call_")]
    assert all(timed.nodes[n.name].fwd_time is not None for n in compute)
    assert timed.nodes["lm_head"].fwd_time > 0 and timed.nodes["lm_head"].bwd_time > 0
    graph = linearize(timed)
    at = graph.names.index("lm_head")
    head = timed.nodes["lm_head"]
    # seconds become FLOP-equivalents of the device measured on, so planning for that device
    # reproduces the measured seconds
    assert timed.profiled_flops == here.flops
    assert graph.compute[at] == pytest.approx((head.fwd_time + head.bwd_time) * here.flops)


def test_profiling_a_meta_model_allocates_one_node_at_a_time() -> None:
    with torch.device("meta"):
        model, inputs, _ = gpt("small", batch=1, seq=32, layers=1)
    analysis = analyze(model, inputs)
    timed = profile(analysis.costs, PRESETS["cpu"], repeats=1, warmup=0)
    assert timed.nodes["lm_head"].fwd_time > 0
    assert all(p.device.type == "meta" for p in model.parameters())  # nothing kept


def test_a_profiled_plan_prices_stages_in_measured_seconds() -> None:
    model, inputs, _ = gpt("toy", batch=8)
    plan = plan_model(model, inputs, devices=parse_devices("cpu", 2), microbatches=4, profile=True)
    assert plan.bottleneck == max(s.time for s in plan.stages) > 0
    # measured CPU times (Python dispatch included) dwarf what 100 GFLOP/s predicts for a toy model
    flops_plan = plan_model(model, inputs, devices=parse_devices("cpu", 2), microbatches=4)
    assert sum(s.compute_time for s in plan.stages) > sum(s.compute_time for s in flops_plan.stages)
