"""`pipeline.runtime.finite` on one process: which tensors are not finite, what each
``on_nonfinite`` does with a step found so, the option's check, and a one-rank `Pipeline`
stopping, skipping or warning."""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from partition.errors import NonFiniteError, PlanError, StageError
from pipeline.runtime.finite import decide, nonfinite_names
from pipeline.runtime.options import PipelineOptions
from pipeline.runtime.pipeline import Pipeline


def test_a_tensor_is_named_for_one_nan_or_inf_never_for_a_huge_finite_value() -> None:
    fine = torch.ones(100)
    huge = torch.full((100,), 1e30)  # its 2-norm overflows float32: still finite
    nan, inf, neg = fine.clone(), fine.clone(), fine.clone().double()
    nan[7], inf[3], neg[0] = float("nan"), float("inf"), float("-inf")
    ints = torch.tensor([1, 2, 3])  # not floating point: never checked
    named = [("fine", fine), ("huge", huge), ("nan", nan), ("ints", ints), ("inf", inf)]
    assert nonfinite_names([*named, ("neg", neg), ("empty", torch.ones(0))]) == [
        "nan",
        "inf",
        "neg",
    ]
    assert nonfinite_names([("fine", fine), ("huge", huge)]) == []


def test_stop_raises_naming_the_step_what_and_the_ways_on() -> None:
    with pytest.raises(NonFiniteError) as raised:
        decide("the loss is nan on stage 1", "stop", rank=1, step=14)
    message = str(raised.value)
    assert message.startswith("[rank 1 · step 14] not finite: the loss is nan on stage 1.")
    assert "the weights are those step 14 started from" in message
    for way in ("--lr", "--clip", "--on-nonfinite skip", "on_nonfinite='skip'"):
        assert way in message
    assert isinstance(raised.value, StageError) and isinstance(raised.value, FloatingPointError)


def test_skip_drops_the_update_warn_keeps_it_both_say_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert decide(None, "stop", rank=0, step=3)  # all finite: update, nothing said
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="pipeline.runtime.finite"):
        assert decide("gradients not finite on stage 0", "skip", rank=0, step=3) is False
        assert decide("gradients not finite on stage 0", "warn", rank=0, step=4) is True
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "[rank 0 · step 3] not finite: gradients not finite on stage 0; its update is dropped",
        "[rank 0 · step 4] not finite: gradients not finite on stage 0; training on "
        "(on_nonfinite='warn')",
    ]


def test_the_option_is_checked_when_made() -> None:
    assert PipelineOptions().on_nonfinite == "stop"
    with pytest.raises(
        PlanError, match="on_nonfinite must be one of 'stop', 'skip', 'warn', got 'ignore'"
    ):
        PipelineOptions(on_nonfinite="ignore")  # type: ignore[arg-type]


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 4) -> (B, 1)
        return self.layers(x)


def _chain() -> Any:
    return Chain(), (torch.zeros(4, 4),), F.mse_loss


def _pipe(policy: str) -> Pipeline:
    return Pipeline(
        _chain,
        options=PipelineOptions(microbatches=2, on_nonfinite=policy),  # type: ignore[arg-type]
        optimizer_factory=functools.partial(torch.optim.SGD, lr=0.1),
    )


def test_a_pipeline_stops_skips_or_warns_at_the_step(one_rank: None) -> None:
    """One rank, one stage: the wiring in `Pipeline.step` (the ranks' agreement is
    `tests/pipeline/test_nonfinite.py`'s)."""
    x, y = torch.randn(4, 4), torch.randn(4, 1)
    bad = torch.full_like(y, math.inf)
    stop = _pipe("stop")
    stop.step(x, y)
    before = {n: p.detach().clone() for n, p in stop.named_parameters().items()}
    with pytest.raises(NonFiniteError, match=r"^\[rank 0 · step 1\] not finite: the loss is inf"):
        stop.step(x, bad)
    for name, p in stop.named_parameters().items():  # stopped before the optimizer stepped
        assert torch.equal(p, before[name]), name
    skip = _pipe("skip")
    before = {n: p.detach().clone() for n, p in skip.named_parameters().items()}
    assert math.isinf(float(skip.step(x, bad)))  # the loss still comes back
    assert skip.nonfinite_steps == [0] and skip.steps_done == 1
    for name, p in skip.named_parameters().items():  # dropped: no update, no gradient left
        assert torch.equal(p, before[name]) and p.grad is None, name
    warn = _pipe("warn")
    warn.step(x, bad)
    assert warn.nonfinite_steps == [0]
    assert not all(torch.isfinite(p).all() for p in warn.named_parameters().values())


def test_skip_needs_an_optimizer(one_rank: None) -> None:
    with pytest.raises(PlanError, match="on_nonfinite='skip' drops the optimizer's update"):
        Pipeline(_chain, options=PipelineOptions(microbatches=2, on_nonfinite="skip"))


def test_the_largest_magnitude_is_one_foreach_reduction_over_mixed_dtypes() -> None:
    from pipeline.runtime.finite import _max_abs

    cpu = torch.device("cpu")
    grads = [torch.full((3,), -7.0), torch.ones(4, dtype=torch.float16), torch.zeros(0)]
    grads.append(torch.tensor([1e30], dtype=torch.float64))  # huge, finite
    found = _max_abs(grads, cpu)
    assert found.dtype == torch.float32 and found.item() == pytest.approx(1e30, rel=1e-6)
    grads[1][2] = float("nan")
    assert math.isnan(_max_abs(grads, cpu).item())
    assert _max_abs([torch.zeros(0)], cpu).item() == 0.0
