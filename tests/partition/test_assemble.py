"""A plan assembled from a split: every stage's numbers against the stage modules themselves."""

from __future__ import annotations

import pytest
import torch

from partition import analyze
from partition.devices import Device
from partition.models.examples import gpt, skipnet
from partition.options import PlanOptions
from partition.planning.assemble import build_plan
from partition.split import split

# Slow compute and fast links: the partitioner spreads the model over every stage.
DEVICE = Device(name="slow", memory=16 * 2**30, flops=1e6, bandwidth=1e15, latency=0.0)


@pytest.mark.parametrize("tied", [False, True])
def test_each_stage_holds_what_its_module_holds(tied: bool) -> None:
    model, inputs, _ = gpt("toy", batch=4, tie_weights=tied)
    analysis = analyze(model, inputs, microbatches=2)
    devices = [DEVICE] * 3
    solution = analysis.solve(devices, PlanOptions(microbatches=2))
    plan = build_plan(analysis, solution)
    stages = split(analysis.traced, analysis.graph, solution.bounds)
    params = dict(model.named_parameters(remove_duplicate=False))
    g = analysis.graph
    assert plan.bounds == solution.bounds and plan.num_ranks == 3
    assert min(b - a for a, b in zip(plan.bounds, plan.bounds[1:], strict=False)) > 10
    for s, (sp, stage) in enumerate(zip(plan.stages, stages, strict=True)):
        lo, hi = sp.start, sp.stop
        assert (lo, hi) == (solution.bounds[s], solution.bounds[s + 1])
        assert (sp.first_node, sp.last_node) == (g.names[lo], g.names[hi - 1])
        assert sp.device == devices[s] and sp.inflight == solution.evaluation.stage_inflight[s]
        # the partitioner's parameter bytes are the module's (a tied weight at its first user)
        held = {id(params[n]): params[n] for n in stage.params if n in params}
        if not tied:
            assert sp.param_bytes == sum(p.numel() * p.element_size() for p in held.values())
        # what crosses: the specs of the tensors the stage really sends, priced in send_bytes
        assert sp.inputs == stage.inputs
        if s < 2:
            assert sp.outputs == stage.outputs == stages[s + 1].inputs
            assert sp.send_bytes == sum(t.nbytes for t in stage.outputs)
        else:
            assert sp.outputs == () and sp.send_bytes == 0
        assert sp.memory["total"] == pytest.approx(
            sum(v for k, v in sp.memory.items() if k != "total")
        )
        assert sp.compute_time + sp.comm_time == solution.evaluation.stage_times[s]
    assert plan.bottleneck == solution.evaluation.bottleneck
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # each once
    assert sum(sp.param_bytes for sp in plan.stages) == total
    if tied:  # the embedding on the first stage, the LM head on the last: both hold it
        assert plan.shared_params == {"wte.weight": [0, 2]}
    else:
        assert plan.shared_params == {}


def test_given_stages_are_used_as_they_are() -> None:
    model, inputs, _ = skipnet(batch=4)
    analysis = analyze(model, inputs)
    solution = analysis.solve([DEVICE] * 2)
    stages = split(analysis.traced, analysis.graph, solution.bounds)
    plan = build_plan(analysis, solution, stages=stages)
    assert plan == build_plan(analysis, solution)
    assert plan.model == analysis.model_info() and plan.algorithm == "optimal"
    assert plan.stages[0].first_module == "inp" and plan.stages[-1].last_module == "out"
    assert all(isinstance(t.shape, tuple) for t in plan.stages[0].inputs)
    assert plan.stages[0].inputs[0].shape == tuple(inputs[0].shape)
    assert torch.float32 == plan.stages[0].inputs[0].torch_dtype
