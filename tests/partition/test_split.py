"""Split: stage modules reproduce the model bit for bit, keep parameter names, and need no memory."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from typing import Any

import pytest
import torch

from partition import analyze
from partition.errors import PlanError
from partition.models.examples import gpt, skipnet, two_tower
from partition.split import split
from partition.trace.fx import TracedModel, TraceMethod
from pipeline.runtime.init import initialize, materialize

Factory = Callable[[], tuple[Any, tuple[torch.Tensor, ...], Any]]

MODELS: dict[str, Factory] = {
    "gpt": lambda: gpt("toy", batch=2),
    "gpt-tied": lambda: gpt("toy", batch=2, tie_weights=True),
    "skipnet": lambda: skipnet(batch=3),
    "two-tower": lambda: two_tower(batch=3),
}


def _run(stages: list[Any], inputs: list[torch.Tensor]) -> Any:
    values: Any = tuple(inputs)
    for stage in stages:
        values = stage(*values)
    return values


def _stage0_inputs(traced: TracedModel, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """What stage 0 takes: these models' inputs are positional tensors, in the traced order."""
    assert len(inputs) == len(traced.input_names)
    assert all(isinstance(x, torch.Tensor) for x in inputs)
    return list(inputs)


def _random_bounds(n: int, rng: random.Random) -> list[int]:
    k = rng.randint(1, min(6, n))
    return [0, *sorted(rng.sample(range(1, n), k - 1)), n]


@pytest.mark.parametrize("method", ["fx", "export"])
@pytest.mark.parametrize("name", list(MODELS))
def test_stages_in_sequence_equal_the_model_bit_for_bit(name: str, method: TraceMethod) -> None:
    model, inputs, _ = MODELS[name]()
    analysis = analyze(model, inputs, method=method)
    expected = model(*inputs)
    rng = random.Random(name)
    n = len(analysis.graph)
    for bounds in [[0, n], [0, 1, n], [0, n - 1, n], *(_random_bounds(n, rng) for _ in range(25))]:
        stages = split(analysis.traced, analysis.graph, bounds)
        out = _run(stages, _stage0_inputs(analysis.traced, inputs))  # the model's own structure
        if isinstance(expected, tuple):
            assert all(torch.equal(a, b) for a, b in zip(expected, out, strict=True)), bounds
        else:
            assert torch.equal(expected, out), bounds
        for before, after in itertools.pairwise(stages):
            assert before.outputs == after.inputs  # what one sends is what the next receives


def test_parameter_names_are_the_models() -> None:
    model, inputs, _ = gpt("toy", batch=2, tie_weights=True)
    analysis = analyze(model, inputs)
    n = len(analysis.graph)
    stages = split(analysis.traced, analysis.graph, [0, n // 3, 2 * n // 3, n])
    full = model.state_dict()
    for stage in stages:
        for key, value in stage.module.state_dict().items():
            assert key in full and value is not None and torch.equal(value, full[key])
    # every parameter lands in some stage; the tied weight is read by the first and last stage
    held = {key for stage in stages for key in stage.module.state_dict()}
    assert held == set(full)
    assert "wte.weight" in stages[0].params and "lm_head.weight" in stages[-1].params


def test_skip_connection_passes_through_middle_stages() -> None:
    model, inputs, _ = skipnet(batch=3, depth=6)
    analysis = analyze(model, inputs)
    names = analysis.graph.names
    start = names.index("layers_1") if "layers_1" in names else len(names) // 3
    bounds = [0, start, start + 4, len(names)]
    stages = split(analysis.traced, analysis.graph, bounds)
    # the tanh skip made in stage 0 is used only in the last stage: stage 1 relays it
    assert any(spec.name == "tanh" for spec in stages[1].inputs)
    assert any(spec.name == "tanh" for spec in stages[1].outputs)


def test_meta_model_splits_without_allocating_and_one_stage_materialises() -> None:
    torch.manual_seed(0)
    reference, _, _ = gpt("toy", batch=2)
    initialize(reference, seed=7, init_hook=reference._init_weights)
    with torch.device("meta"):
        model, meta_inputs, _ = gpt("toy", batch=2)
    analysis = analyze(model, meta_inputs)
    n = len(analysis.graph)
    stages = split(analysis.traced, analysis.graph, [0, n // 2, n])
    assert all(t.device.type == "meta" for s in stages for t in s.module.state_dict().values())
    last = materialize(stages[1].module, "cpu", seed=7, init_hook=model._init_weights)
    assert all(t.device.type == "cpu" for t in last.state_dict().values())
    assert all(t.device.type == "meta" for t in stages[0].module.state_dict().values())  # untouched
    full = reference.state_dict()
    assert all(torch.equal(v, full[k]) for k, v in last.state_dict().items())


def test_bad_bounds_are_rejected() -> None:
    model, inputs, _ = skipnet()
    analysis = analyze(model, inputs)
    n = len(analysis.graph)
    for bounds in ([0, 5, 5, n], [1, n], [0, n + 1], [0]):
        with pytest.raises(PlanError, match="bounds"):
            split(analysis.traced, analysis.graph, bounds)
