"""transformers models end to end: traced on meta at published size, and trained on gloo ranks
with loss and every gradient equal to the same model in one process."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from partition import analyze, parse_devices, plan_analysis
from partition.models.registry import resolve
from pipeline.launch.run import RunOptions, run_pipeline
from pipeline.runtime.pipeline import PipelineOptions

MODELS = ["hf:gpt2", "hf:bert", "hf:llama", "hf:vit"]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_published_size_traces_on_meta_and_plans_for_4_devices(name: str) -> None:
    spec = resolve(name, size="real", batch=8, seq=None if name == "hf:vit" else 512)
    with torch.device("meta"):
        model, args, kwargs, _, _ = spec.build()
    analysis = analyze(model, args, kwargs, microbatches=4)
    assert analysis.traced.method == "export"  # transformers 5 models only export
    plan = plan_analysis(analysis, parse_devices("a100-40", 4))
    assert plan.fits() and plan.num_stages == 4
    params = sum(p.numel() for p in model.parameters())  # each once: tied weights too
    buffers = sum(b.numel() for b in model.buffers())  # counted when the forward reads them
    assert params <= plan.model.num_parameters <= params + buffers
    assert plan.model.class_name == type(model).__name__
    named = [s.first_module for s in plan.stages[1:]]
    assert all(path and "L[" not in path for path in named), named  # the user's module paths
    if name == "hf:gpt2":  # wte is read by the embedding and by the tied LM head
        assert plan.shared_params == {"transformer.wte.weight": [0, 3]}


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("name", MODELS)
def test_tiny_model_trains_on_ranks_like_one_process(name: str, ranks: int) -> None:
    result = run_pipeline(
        name,
        RunOptions(
            ranks=ranks,
            steps=2,
            check=True,
            timeout=120,
            optimizer="sgd",
            lr=0.1,
            pipeline=PipelineOptions(schedule="1f1b", microbatches=4),
        ),
    )
    assert result is not None and result.check is not None
    check = result.check
    assert check.loss < 1e-5, check
    assert check.grads < 1e-5, check
    assert check.params < 1e-5, check
    first, second = (s.loss for s in result.steps)
    assert first is not None and second is not None
    assert second < first
