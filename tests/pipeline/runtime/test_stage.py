"""One stage's forward and backward against the same model run whole in one process (float64).

Every cut of a small model with a skip connection is tried: the stages run their micro-batches
by hand (forward on every stage, then backward from the last), and the loss and every gradient
must equal those of the whole batch through the unsplit model — for the whole backward, the split
one (I then W, see [Note: zero-bubble backward]) and recompute.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from partition import analyze
from partition.errors import PlanError
from partition.split import Stage, split
from pipeline.runtime.stage import StageExecutor

D, M, B = 5, 4, 3  # width, micro-batches, rows per micro-batch


class _Skip(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        g = torch.tanh(self.b(self.drop(h)))
        return self.c(g + h)  # h skips over b


def _sum_mse(out: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(out, target, reduction="sum")


def _setup(dropout: float = 0.0) -> tuple[nn.Module, nn.Module, int, Callable[[int], list[Stage]]]:
    """The model (whose parameters the stages share), an untouched copy, the node count, and
    the stages of a cut."""
    torch.manual_seed(0)
    model = _Skip(dropout).double()
    reference = copy.deepcopy(model)
    analysis = analyze(model, (torch.randn(B, D, dtype=torch.float64),))
    n = len(analysis.graph)
    return model, reference, n, lambda cut: split(analysis.traced, analysis.graph, [0, cut, n])


def _batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(M * B, D, generator=g, dtype=torch.float64),
        torch.randn(M * B, D, generator=g, dtype=torch.float64),
    )


def _run(
    stages: list[Stage], x: Tensor, y: Tensor, *, mode: str, reduction: str = "mean", **kw: bool
) -> list[Tensor]:
    """Forward every micro-batch through both stages, then backward; returns the losses."""
    loss_fn = F.mse_loss if reduction == "mean" else _sum_mse
    scale = 1.0 / M if reduction == "mean" else 1.0
    first = StageExecutor(stages[0], **kw)
    last = StageExecutor(stages[1], loss_fn=loss_fn, loss_scale=scale, **kw)
    xs, ys = x.tensor_split(M), y.tensor_split(M)
    for i in range(M):
        assert last.forward(i, first.forward(i, [xs[i]]), ys[i]) == []
    order = list(range(M)) if mode != "split-reversed" else list(reversed(range(M)))
    for i in order:
        if mode == "whole":
            first.backward(i, last.backward(i))
        else:
            first.backward_input(i, last.backward_input(i))
    if mode != "whole":
        for i in order:
            last.backward_weight(i)
            first.backward_weight(i)
    return last.losses


def _reference(reference: nn.Module, x: Tensor, y: Tensor, reduction: str) -> Tensor:
    loss = F.mse_loss(reference(x), y, reduction=reduction)  # type: ignore[arg-type]
    loss.backward()
    return loss.detach()


def _assert_grads_equal(model: nn.Module, reference: nn.Module, where: str) -> None:
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None, f"{where}: {name}"
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14, msg=f"{where}: {name}")


@pytest.mark.parametrize("mode", ["whole", "split", "split-reversed"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_cut_gives_the_whole_batchs_loss_and_gradients(mode: str, reduction: str) -> None:
    model, reference, n, stages_at = _setup()
    x, y = _batch()
    expected = _reference(reference, x, y, reduction)
    for cut in range(1, n):
        model.zero_grad(set_to_none=True)
        losses = _run(stages_at(cut), x, y, mode=mode, reduction=reduction)
        total = torch.stack(losses).sum()
        loss = total / M if reduction == "mean" else total
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
        _assert_grads_equal(model, reference, f"cut {cut}")


def test_recompute_gives_the_same_gradients_with_dropout() -> None:
    """The forward runs again in the backward, with the random state it first had."""
    x, y = _batch()
    grads = []
    for recompute in (False, True):
        model, _, n, stages_at = _setup(dropout=0.5)
        torch.manual_seed(7)
        _run(stages_at(n // 2), x, y, mode="whole", recompute=recompute)
        grads.append([p.grad for p in model.parameters()])
    for g, h in zip(*grads, strict=True):
        assert g is not None and h is not None and torch.equal(g, h)


def test_input_gradients_are_those_of_the_stage_boundary() -> None:
    _, _, n, stages_at = _setup()
    x, y = _batch()
    x0, y0 = x[:B], y[:B]
    stages = stages_at(n // 2)
    first, last = StageExecutor(stages[0]), StageExecutor(stages[1], loss_fn=F.mse_loss)
    sent = first.forward(0, [x0])
    last.forward(0, sent, y0)
    received = last.backward(0)
    leaves = [t.detach().requires_grad_(True) for t in sent]
    F.mse_loss(stages[1].module(*leaves), y0).backward()  # the second stage alone, eagerly
    assert len(received) == len(leaves)
    for got, leaf in zip(received, leaves, strict=True):
        assert leaf.grad is not None and torch.equal(got, leaf.grad)


def test_evaluate_runs_forward_only() -> None:
    _, reference, n, stages_at = _setup()
    x, y = _batch()
    stages = stages_at(n // 2)
    first, last = StageExecutor(stages[0]), StageExecutor(stages[1], loss_fn=F.mse_loss)
    with torch.enable_grad():
        out = last.evaluate(first.evaluate([x]))
        loss = last.evaluate(first.evaluate([x]), y)
    assert not out.requires_grad and not loss.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(out, reference(x), rtol=1e-12, atol=0)
        torch.testing.assert_close(loss, F.mse_loss(reference(x), y), rtol=1e-12, atol=0)


def test_autocast_sends_the_plans_dtypes() -> None:
    _, _, n, stages_at = _setup()
    stages = stages_at(n // 2)
    first = StageExecutor(stages[0], autocast=torch.bfloat16)
    sent = first.forward(0, [torch.randn(B, D, dtype=torch.float64)])
    assert [t.dtype for t in sent] == [s.torch_dtype for s in stages[0].outputs]


def test_reset_forgets_the_micro_batches_in_flight() -> None:
    _, _, n, stages_at = _setup()
    x, y = _batch()
    stages = stages_at(n // 2)
    last = StageExecutor(stages[1], loss_fn=F.mse_loss)
    first = StageExecutor(stages[0])
    last.forward(0, first.forward(0, [x[:B]]), y[:B])
    assert last.losses and last._saved
    last.reset()
    assert not last.losses and not last._saved
    with pytest.raises(KeyError):
        last.backward(0)


def test_the_last_stage_needs_a_loss_function() -> None:
    _, _, n, stages_at = _setup()
    with pytest.raises(PlanError, match="stage 1 is the last stage and needs a loss function"):
        StageExecutor(stages_at(n // 2)[1])
