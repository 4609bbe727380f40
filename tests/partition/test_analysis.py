"""Analysis: a model traced and costed at micro-batch shape, its identity, and plans for it."""

from __future__ import annotations

import pytest
import torch

from partition import analyze, plan_model
from partition.devices import parse_devices
from partition.errors import BatchError, PlanError
from partition.models.examples import gpt, skipnet
from partition.options import PlanOptions
from partition.planning.analysis import analyze_traced, stages_for_plan
from partition.split import split
from partition.trace.fx import trace


def test_a_batch_is_traced_at_micro_batch_shape() -> None:
    model, (idx,), _ = gpt("toy", batch=8, seq=5)
    lines: list[str] = []
    analysis = analyze(model, (idx,), microbatches=4, progress=lines.append)
    assert analysis.microbatches == 4
    assert [(t.name, t.shape, t.dtype) for t in analysis.inputs] == [("idx", (2, 5), "int64")]
    assert lines[0] == "tracing GPT" and lines[1].startswith("costing ")
    nodes = [n for n in analysis.traced.graph.nodes if n.op != "output"]
    assert len(analysis.graph) == len(nodes)
    assert analysis.costs.param_numel == sum(p.numel() for p in model.parameters())
    with pytest.raises(BatchError, match="batch 8 is not divisible by 3"):
        analyze(model, (idx,), microbatches=3)


def test_the_model_info_is_the_model() -> None:
    model, inputs, _ = gpt("toy", batch=2, tie_weights=True)
    info = analyze(model, inputs).model_info()
    params = list(model.parameters())  # a tied weight once
    assert info.class_name == "GPT" and info.num_parameters == sum(p.numel() for p in params)
    assert info.param_bytes == sum(p.numel() * p.element_size() for p in params)
    assert info.trace_method == "fx" and info.order in ("graph", "late")
    assert info.num_nodes == len(analyze(model, inputs).graph)


def test_the_graph_hash_is_the_shape_of_the_graph_not_the_weights() -> None:
    model, inputs, _ = gpt("toy", batch=2)
    first = analyze(model, inputs).graph_hash
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    assert analyze(model, inputs).graph_hash == first  # new weights, the same graph
    assert analyze(gpt("toy", batch=2)[0], inputs).graph_hash == first  # another instance
    assert analyze(model, (inputs[0][:, :8],)).graph_hash != first  # another shape
    assert analyze(gpt("toy", batch=2, layers=3)[0], inputs).graph_hash != first


def test_a_solve_must_use_the_traced_micro_batches() -> None:
    model, inputs, _ = skipnet(batch=8)
    analysis = analyze(model, inputs, microbatches=2)
    with pytest.raises(PlanError, match="traced as 2 micro-batches, the options ask for 4"):
        analysis.solve(parse_devices("cpu", 2), PlanOptions(microbatches=4))
    solution = analysis.solve(parse_devices("cpu", 2))  # the analysis' own by default
    assert solution.problem.microbatches == 2


def test_analysing_a_trace_is_analysing_the_model() -> None:
    model, inputs, _ = skipnet(batch=4)
    direct = analyze(model, inputs)
    traced = trace(model, inputs)
    again = analyze_traced(traced)
    assert again.graph.names == direct.graph.names and again.graph_hash == direct.graph_hash
    assert (again.graph.compute == direct.graph.compute).all()


def test_a_plan_gives_its_stages_for_its_model_only() -> None:
    model, inputs, _ = skipnet(batch=4)
    plan = plan_model(model, inputs, devices=parse_devices("cpu", 2), microbatches=2)
    traced = trace(model, (inputs[0][:2],))  # what a rank traces: one micro-batch
    stages = stages_for_plan(traced, plan)
    analysis = analyze(model, inputs, microbatches=2)
    want = split(analysis.traced, analysis.graph, plan.bounds)
    assert [s.nodes for s in stages] == [s.nodes for s in want]
    assert [s.inputs for s in stages] == [s.inputs for s in want]
    with pytest.raises(PlanError, match="this plan was made for another model"):
        stages_for_plan(trace(model, (inputs[0],)), plan)  # the whole batch: other shapes
