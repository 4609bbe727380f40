"""Optimizers by name, and a rank's optimizer and LR scheduler."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from partition.errors import InputError
from pipeline.runtime.optim import OPTIMIZER_CLASSES, OptimizerFactory, build_optimizer


@pytest.mark.parametrize("name", sorted(OPTIMIZER_CLASSES))
def test_a_factory_builds_the_named_optimizer_with_its_lr(name: str) -> None:
    params = [nn.Parameter(torch.ones(3))]
    factory = pickle.loads(pickle.dumps(OptimizerFactory(name, 0.25)))  # crosses processes
    optimizer = factory(params)
    assert type(optimizer) is OPTIMIZER_CLASSES[name]
    assert optimizer.param_groups[0]["lr"] == 0.25
    assert optimizer.param_groups[0]["params"] == params


def test_the_factory_steps_as_the_class_does() -> None:
    ours, theirs = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    for p in (ours, theirs):
        p.grad = torch.tensor([1.0, -2.0, 0.5])
    OptimizerFactory("adamw", 0.1)([ours]).step()
    torch.optim.AdamW([theirs], lr=0.1).step()
    assert torch.equal(ours, theirs)


def test_an_unknown_name_lists_the_choices() -> None:
    with pytest.raises(
        InputError, match="unknown optimizer 'lion'; choose one of sgd, adam, adamw"
    ):
        OptimizerFactory("lion", 1e-3)


def test_build_optimizer() -> None:
    params = [nn.Parameter(torch.ones(2))]
    optimizer, scheduler = build_optimizer(
        params,
        OptimizerFactory("sgd", 1.0),
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    )
    assert isinstance(optimizer, torch.optim.SGD)
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.5
    assert build_optimizer(params, None) == (None, None)


def test_a_rank_without_parameters_has_nothing_to_step() -> None:
    called = []
    optimizer, scheduler = build_optimizer([], OptimizerFactory("sgd", 1.0), called.append)
    assert (optimizer, scheduler, called) == (None, None, [])
