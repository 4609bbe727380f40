"""The README's flow on the most basic model: `plan_model` on meta, then `Pipeline(model_fn,
plan=plan)` on every rank, for an `nn.Sequential`, whose forward's argument is called ``input``.

The bug (issue 18 item 6): fx renames a placeholder called ``input`` (a builtin) to
``input_1``, the plan recorded that name, and the runtime bound the batch by it: ``InputError:
... missing a required argument: 'input'``. Planning inside `Pipeline` worked, so only the
documented flow broke. The reference is the same model trained eagerly in one process.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from harness import run_ranks
from torch import nn

from partition import plan_model
from partition.devices import parse_devices
from partition.plan import Plan
from pipeline.runtime.pipeline import Pipeline, PipelineOptions


def sequential() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    model = nn.Sequential(
        nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8)
    )
    return model, (torch.zeros(4, 8),)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)


def _train(plan: Plan) -> dict[str, Any]:
    torch.manual_seed(0)
    pipe = Pipeline(
        sequential,
        plan=plan,
        options=PipelineOptions(microbatches=2),
        loss_fn=F.mse_loss,
    )
    x, y = _batch()
    loss = pipe.step(x, y)
    grads = {n: p.grad.clone() for n, p in pipe.named_parameters().items() if p.grad is not None}
    return {"loss": loss, "grads": grads}


@pytest.mark.slow
def test_a_plan_made_on_meta_runs_an_nn_sequential_exactly() -> None:
    with torch.device("meta"):
        model, (example,) = sequential()
    plan = plan_model(model, (example,), devices=parse_devices("cpu", 2), microbatches=2)
    assert plan.model.inputs[0].name in ("input", "input_1")  # what fx calls it, either way
    ranks = run_ranks(2, _train, plan)
    torch.manual_seed(0)
    eager, _ = sequential()
    x, y = _batch()
    for xs, ys in zip(x.chunk(2), y.chunk(2), strict=True):
        (F.mse_loss(eager(xs), ys) / 2).backward()
    losses = [r["loss"] for r in ranks if r["loss"] is not None]
    assert len(losses) == 1
    with torch.no_grad():
        want = (
            sum(F.mse_loss(eager(xs), ys) for xs, ys in zip(x.chunk(2), y.chunk(2), strict=True))
            / 2
        )
    assert torch.allclose(losses[0], want, rtol=1e-6, atol=0)
    grads = {n: g for r in ranks for n, g in r["grads"].items()}
    assert set(grads) == {n for n, _ in eager.named_parameters()}
    for name, p in eager.named_parameters():
        assert p.grad is not None
        assert torch.allclose(grads[name], p.grad, rtol=1e-5, atol=1e-7), name
