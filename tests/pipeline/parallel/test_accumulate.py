"""Where each gradient is complete (`ready_points`) and the scaling of accumulated steps
([Note: one reduction per optimizer step] in `pipeline.parallel.accumulate`), on one process."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from partition.schedules.actions import Kind, build_schedule
from pipeline.parallel.accumulate import GradientSync, ready_points
from pipeline.parallel.mesh import Replicas

ONE = Replicas(None, None, None, None, 1, 0)


def _executors(stages: tuple[int, ...], shared: nn.Parameter | None = None) -> dict[int, Any]:
    """A stand-in executor per stage: two parameters of its own (and ``shared`` in each)."""
    out = {}
    for s in stages:
        params = [nn.Parameter(torch.full((2,), float(s))), nn.Parameter(torch.zeros(3))]
        out[s] = SimpleNamespace(parameters=[*params, *([shared] if shared is not None else [])])
    return out


@pytest.mark.parametrize(
    ("name", "virtual", "kind"),
    [("gpipe", 1, Kind.B), ("1f1b", 1, Kind.B), ("zb-h1", 1, Kind.W), ("interleaved", 2, Kind.B)],
)
def test_a_stage_is_ready_after_its_last_backward(name: str, virtual: int, kind: Kind) -> None:
    schedule = build_schedule(name, 2, 4, virtual)
    for rank in range(2):
        actions = schedule.actions[rank]
        executors = _executors(schedule.stages_of(rank))
        points = ready_points(actions, executors)
        assert len(points) == len(executors)  # one point per stage: its own parameters
        for index, params in points:
            action = actions[index]
            assert action.kind is kind
            assert params == executors[action.stage].parameters
            later = [a for a in actions[index + 1 :] if a.stage == action.stage]
            assert not [a for a in later if a.kind in (Kind.B, Kind.W, Kind.I, Kind.F)]
        assert [i for i, _ in points] == sorted(i for i, _ in points)


def test_a_parameter_of_two_stages_is_ready_after_the_later_one() -> None:
    schedule = build_schedule("interleaved", 1, 2, 2)  # stages 0 and 1 on one rank
    shared = nn.Parameter(torch.ones(4))
    executors = _executors((0, 1), shared)
    points = ready_points(schedule.actions[0], executors)
    holding = [index for index, params in points if any(p is shared for p in params)]
    assert len(holding) == 1
    assert holding[0] == max(index for index, _ in points)


def _grads(sync: GradientSync, params: list[nn.Parameter], steps: int) -> list[torch.Tensor]:
    for p in params:
        p.grad = None
    for k in range(steps):
        for p in params:
            g = torch.full_like(p, float(k + 1))
            p.grad = g if p.grad is None else p.grad + g
        sync.finish(accumulate=k < steps - 1)
    return [p.grad.clone() for p in params if p.grad is not None]


def test_accumulated_steps_are_averaged_once_for_a_mean_and_summed_for_a_sum() -> None:
    schedule = build_schedule("gpipe", 1, 2)
    executors = _executors((0,))
    params = executors[0].parameters
    mean = GradientSync(schedule.actions[0], executors, replicas=ONE, reduction="mean")
    assert mean.hooks(accumulate=False) == {}  # no replicas: nothing to start
    assert [g.tolist() for g in _grads(mean, params, 3)] == [[2.0, 2.0], [2.0] * 3]  # (1+2+3)/3
    assert mean.accumulated == 0
    assert [g.tolist() for g in _grads(mean, params, 1)] == [[1.0, 1.0], [1.0] * 3]
    total = GradientSync(schedule.actions[0], executors, replicas=ONE, reduction="sum")
    assert [g.tolist() for g in _grads(total, params, 3)] == [[6.0, 6.0], [6.0] * 3]
