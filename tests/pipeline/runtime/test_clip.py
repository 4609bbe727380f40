"""Clipping by the global norm against ``torch.nn.utils.clip_grad_norm_`` on one process.

A tied weight (one parameter listed under two names, or held on two ranks) must count once in
the norm and be scaled once.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from harness import run_ranks
from torch import nn

from pipeline.runtime.clip import clip_grad_norm


def _params(seed: int = 0) -> list[nn.Parameter]:
    """Four float64 parameters with gradients (a norm of about 8)."""
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in ((3, 4), (4,), (2, 2, 2), (5,)):
        p = nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64))
        p.grad = torch.randn(shape, generator=g, dtype=torch.float64)
        params.append(p)
    return params


def _clone(params: list[nn.Parameter]) -> list[nn.Parameter]:
    out = []
    for p in params:
        q = nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 1e6])
def test_one_process_equals_torch(max_norm: float) -> None:
    ours, theirs = _params(), _params()
    norm = clip_grad_norm(ours, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert norm == pytest.approx(float(expected), rel=1e-12)
    for p, q in zip(ours, theirs, strict=True):
        assert p.grad is not None and q.grad is not None
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=0)
    clipped = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in ours if p.grad is not None))
    assert clipped == pytest.approx(min(max_norm, float(expected)), rel=1e-6)


def test_a_weight_listed_twice_counts_and_scales_once() -> None:
    """A weight tied within a rank (an embedding and its LM head) appears under two names."""
    ours, theirs = _params(), _params()
    listed = [*ours, ours[0], ours[2]]  # as named_parameters(remove_duplicate=False) lists them
    norm = clip_grad_norm(listed, 1.0)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert norm == pytest.approx(float(expected), rel=1e-12)
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=0)


def test_a_weight_counted_elsewhere_is_scaled_but_not_counted() -> None:
    ours, theirs = _params(), _params()
    norm = clip_grad_norm(ours, 1.0, counted=ours[1:])
    expected = torch.nn.utils.clip_grad_norm_(theirs[1:], 1.0)
    assert norm == pytest.approx(float(expected), rel=1e-12)
    coef = 1.0 / (float(expected) + 1e-6)
    first = _params()[0].grad
    assert first is not None
    torch.testing.assert_close(ours[0].grad, first * coef, rtol=1e-12, atol=0)


def test_parameters_without_gradients_are_skipped() -> None:
    ours, theirs = _params(), _params()
    ours[1].grad = theirs[1].grad = None
    norm = clip_grad_norm(ours, 1.0)
    assert norm == pytest.approx(float(torch.nn.utils.clip_grad_norm_(theirs, 1.0)), rel=1e-12)
    assert ours[1].grad is None
    assert clip_grad_norm([], 1.0) == 0.0


# --- across ranks ---------------------------------------------------------------------------

HELD = {0: (0, 3), 1: (1, 2, 3)}
"""The parameters of `_params` each rank holds: number 3 is tied, held on both."""


def _clip_on_rank(max_norm: float) -> tuple[float, list[torch.Tensor]]:
    rank = dist.get_rank()
    params = [_params()[i] for i in HELD[rank]]
    counted = params if rank == 0 else params[:-1]  # the tied weight counts on rank 0 only
    norm = clip_grad_norm(params, max_norm, counted=counted)
    return norm, [p.grad for p in params if p.grad is not None]


@pytest.mark.timeout(120)
def test_two_ranks_equal_one_process() -> None:
    results = run_ranks(2, _clip_on_rank, 1.0, timeout=90)
    theirs = _params()
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    for rank, (norm, grads) in enumerate(results):
        assert norm == pytest.approx(float(expected), rel=1e-12), f"rank {rank}"
        for i, grad in zip(HELD[rank], grads, strict=True):
            torch.testing.assert_close(grad, theirs[i].grad, rtol=1e-12, atol=0)
