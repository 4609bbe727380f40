"""Custom autograd Functions keep their own backward: one opaque node on fx and on export.

Issue 9: a model with a gradient-reversal layer (forward the identity, backward ``-g``) trained
with the reversal lost on every trace route, since tracing went through the Function's forward.
Issue 18: the export route refused such a model, so one that fx cannot trace either (HF BLOOM's
GeLU in train mode, under transformers 5) had no route at all.
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


class _ReversedMatmul(torch.autograd.Function):
    """``x @ w`` forward; backward the true gradients negated (no autograd formula gives it)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.scale = scale
        return x @ w

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        x, w = ctx.saved_tensors
        return -ctx.scale * grad @ w.T, -ctx.scale * x.T @ grad, None


class ShapeBranch(nn.Module):
    """fx cannot trace it (a branch on the batch size); export can. A Function on a weight."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(D, D), nn.Tanh())
        self.w = nn.Parameter(torch.randn(D, D))
        self.head = nn.Sequential(nn.Tanh(), nn.Linear(D, D))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] > 1:
            x = x * 2
        return self.head(_ReversedMatmul.apply(self.features(x), self.w, 0.5))


def test_export_keeps_a_custom_function_opaque_with_its_own_backward() -> None:
    """The only route for a model fx cannot trace: one node, costed on meta, and every split
    trains as the eager model does — the reversed gradient included."""
    x, target = torch.randn(4, D), torch.randn(4, D)
    torch.manual_seed(0)
    reference = ShapeBranch()
    F.mse_loss(reference(x), target).backward()
    torch.manual_seed(0)
    model = ShapeBranch()
    analysis = analyze(model, (x,), method="auto")  # fx fails on the branch; export is used
    assert analysis.traced.method == "export"
    (node,) = [n for n in analysis.traced.graph.nodes if "_ReversedMatmul" in str(n.target)]
    assert node.name == "_reversedmatmul" and node.meta["val"][0].shape == (4, D)
    cost = analysis.costs.nodes[node.name]
    assert cost.fwd_flops == 2 * 4 * D * D  # the Function's forward, run on meta
    assert cost.bwd_flops == 2 * cost.fwd_flops  # and its own backward
    assert cost.params == ("w",) and cost.param_bytes == D * D * 4  # the weight it is given
    n = len(analysis.graph)
    for cut in range(1, n):
        model.zero_grad(set_to_none=True)
        first, last = split(analysis.traced, analysis.graph, [0, cut, n])
        run_first, run_last = StageExecutor(first), StageExecutor(last, loss_fn=F.mse_loss)
        run_last.forward(0, run_first.forward(0, [x]), target)
        run_first.backward(0, run_last.backward(0))
        for (name, p), ref in zip(model.named_parameters(), reference.parameters(), strict=True):
            assert p.grad is not None and torch.allclose(p.grad, ref.grad), f"cut {cut}: {name}"
    w_grad = reference.w.grad
    assert w_grad is not None
    torch.manual_seed(0)
    plain = ShapeBranch()  # the forward's own autograd would give the opposite sign
    h = plain.features(x * 2)
    F.mse_loss(plain.head(h @ plain.w), target).backward()
    assert plain.w.grad is not None and torch.allclose(-0.5 * plain.w.grad, w_grad)


def test_export_keeps_the_gradient_reversal_and_runs_it_on_every_split() -> None:
    x, target = torch.randn(4, D), torch.randn(4, D)
    reference, ref_loss = _eager(x, target)
    torch.manual_seed(0)
    model = Adversarial()
    analysis = analyze(model, (x,), method="export")
    n = len(analysis.graph)
    for cut in range(1, n):
        model.zero_grad(set_to_none=True)
        first, last = split(analysis.traced, analysis.graph, [0, cut, n])
        run_first, run_last = StageExecutor(first), StageExecutor(last, loss_fn=F.mse_loss)
        run_last.forward(0, run_first.forward(0, [x]), target)
        run_first.backward(0, run_last.backward(0))
        assert run_last.losses[0].item() == pytest.approx(ref_loss, rel=1e-6)
        for (name, p), ref in zip(model.named_parameters(), reference.parameters(), strict=True):
            assert p.grad is not None and torch.allclose(p.grad, ref.grad), f"cut {cut}: {name}"


class _Scaled(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, fn: nn.Module) -> Tensor:
        return fn(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _GivenAModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x: Tensor) -> Tensor:
        return _Scaled.apply(x, self.fc)


def test_export_refuses_a_function_given_a_module_and_names_it() -> None:
    """A Function kept as one node holds tensors and constants only: a module passed to it
    would hide its weights from the graph."""
    with pytest.raises(TraceError, match=r"_Scaled \(it is passed a Linear\).*--trace fx"):
        analyze(_GivenAModule(), (torch.randn(4, D),), method="export")


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


def tiny_bloom() -> Any:
    """HF BLOOM, train mode: its GeLU is the custom Function ``GeLUFunction``; under
    transformers 5 fx cannot trace the model (its wrapped ``forward``), so export is the route."""
    from transformers import BloomConfig, BloomForCausalLM

    from partition.models.hf import causal_lm_loss

    config = BloomConfig(n_layer=2, hidden_size=32, n_head=4, vocab_size=64, use_cache=False)
    model = BloomForCausalLM(config).train()
    ids = torch.randint(0, 64, (4, 8))
    return model, {"input_ids": ids}, causal_lm_loss, ids


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bloom_trains_on_two_ranks_like_one_process_through_its_own_gelu() -> None:
    """Issue 18: no route traced BLOOM in train mode. Its GeLU is now one node of the export
    graph running ``GeLUFunction``'s own forward and backward; loss, every gradient and every
    parameter after 2 steps equal the model run eagerly in one process."""
    pytest.importorskip("transformers")
    from pipeline.launch.run import RunOptions, run_pipeline
    from pipeline.runtime.pipeline import PipelineOptions

    with torch.device("meta"):
        model, inputs, _, _ = tiny_bloom()
    analysis = analyze(model, (), inputs)
    assert analysis.traced.method == "export"
    gelus = [n for n in analysis.traced.graph.nodes if "GeLUFunction" in str(n.target)]
    assert len(gelus) == 2
    for node in gelus:  # costed like the elementwise op it is: forward and backward per element
        (out,) = node.meta["val"]
        cost = analysis.costs.nodes[node.name]
        assert out.shape == (4, 8, 4 * 32) and cost.output_bytes == out.numel() * 4
        assert cost.elementwise_flops == 3 * out.numel(), cost
    result = run_pipeline(
        tiny_bloom,
        RunOptions(
            ranks=2,
            steps=2,
            check=True,
            timeout=120,
            optimizer="sgd",
            lr=0.1,
            pipeline=PipelineOptions(schedule="1f1b", microbatches=2),
        ),
    )
    assert result is not None and result.check is not None
    check = result.check
    assert check.passed, check
    assert max(check.loss, check.grads, check.params) < 1e-5, check
