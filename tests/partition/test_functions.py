"""Custom autograd Functions keep their own backward: one opaque node on fx, a clear refusal on export.

Issue 9: a model with a gradient-reversal layer (forward the identity, backward ``-g``) trained
with the reversal lost on every trace route, since tracing went through the Function's forward.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from partition import analyze
from partition.errors import TraceError
from partition.split import split
from pipeline.runtime.stage import StageExecutor

D = 6


class _Reverse(torch.autograd.Function):
    """Forward the identity, backward the gradient times ``-alpha``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, alpha: float) -> Tensor:
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.alpha * grad, None


class Adversarial(nn.Module):
    """Features, a gradient reversal, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, D))
        self.head = nn.Sequential(nn.Tanh(), nn.Linear(D, D))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(_Reverse.apply(self.features(x), 0.5))


def _eager(x: Tensor, target: Tensor) -> tuple[nn.Module, float]:
    torch.manual_seed(0)
    model = Adversarial()
    loss = F.mse_loss(model(x), target)
    loss.backward()
    return model, loss.item()


@pytest.mark.parametrize("method", ["fx", "auto"])
def test_gradients_through_the_reversal_equal_the_models_sign_included(method: str) -> None:
    x, target = torch.randn(4, D), torch.randn(4, D)
    reference, ref_loss = _eager(x, target)
    torch.manual_seed(0)
    model = Adversarial()
    analysis = analyze(model, (x,), method=method)
    assert analysis.traced.method == "fx"
    (node,) = [n for n in analysis.traced.graph.nodes if "_Reverse_apply" in str(n.target)]
    assert node.meta["val"].shape == (4, D)
    n = len(analysis.graph)
    for cut in range(1, n):
        model.zero_grad(set_to_none=True)
        first, last = split(analysis.traced, analysis.graph, [0, cut, n])
        run_first, run_last = StageExecutor(first), StageExecutor(last, loss_fn=F.mse_loss)
        run_last.forward(0, run_first.forward(0, [x]), target)
        run_first.backward(0, run_last.backward(0))
        assert run_last.losses[0].item() == ref_loss
        for (name, p), ref in zip(model.named_parameters(), reference.parameters(), strict=True):
            assert p.grad is not None and torch.equal(p.grad, ref.grad), f"cut {cut}: {name}"
    feature_grad = reference.features[0].weight.grad
    assert feature_grad is not None and feature_grad.abs().sum() > 0  # the reversal mattered


def test_export_refuses_a_custom_function_and_names_it() -> None:
    with pytest.raises(TraceError, match=r"_Reverse.*lose their backward.*--trace fx"):
        analyze(Adversarial(), (torch.randn(4, D),), method="export")


class _Checkpointed(nn.Module):
    """torch's own reentrant checkpoint: a Function whose forward runs under ``no_grad``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x: Tensor) -> Tensor:
        return torch.utils.checkpoint.checkpoint(self.fc, x, use_reentrant=True)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_a_reentrant_checkpoint_traces_on_fx_and_is_refused_by_export() -> None:
    model, x = _Checkpointed(), torch.randn(4, D)
    analysis = analyze(model, (x,), method="fx")  # traced through: the gradient is kept
    (stage,) = split(analysis.traced, analysis.graph, [0, len(analysis.graph)])
    stage(x).sum().backward()
    assert model.fc.weight.grad is not None
    with pytest.raises(TraceError, match="CheckpointFunction"):  # export would record no_grad
        analyze(model, (x,), method="export")
