"""Optimizers: what builds a rank's (`OptimizerFn`), and by name the one table the command line
and the launcher share; the planner prices them under the same names
(`partition.memory.OPTIMIZER_STATES`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from partition.errors import InputError

__all__ = ["OPTIMIZER_CLASSES", "OptimizerFactory", "OptimizerFn", "SchedulerFn", "build_optimizer"]

OptimizerFn = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
"""``optimizer_factory(params)``: the optimizer of a rank's parameters (an `OptimizerFactory`,
or any callable such as ``functools.partial(torch.optim.AdamW, lr=3e-4)``)."""
SchedulerFn = Callable[[torch.optim.Optimizer], Any]
"""``lr_scheduler_factory(optimizer)``: the LR scheduler of a rank's optimizer."""

OPTIMIZER_CLASSES: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}
"""``--optimizer NAME`` -> the optimizer class, built with ``lr`` and its defaults otherwise."""


@dataclass(frozen=True)
class OptimizerFactory:
    """A picklable `OptimizerFn` for an optimizer of `OPTIMIZER_CLASSES`, by name.

    Raises:
        InputError: the name is not in `OPTIMIZER_CLASSES` (on construction).
    """

    name: str
    lr: float

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZER_CLASSES:
            raise InputError(
                f"unknown optimizer {self.name!r}; choose one of {', '.join(OPTIMIZER_CLASSES)}"
            )

    def __call__(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return OPTIMIZER_CLASSES[self.name](params, lr=self.lr)


def build_optimizer(
    params: list[nn.Parameter],
    optimizer_factory: OptimizerFn | None,
    lr_scheduler_factory: SchedulerFn | None = None,
) -> tuple[torch.optim.Optimizer | None, Any]:
    """``(optimizer, LR scheduler)`` of a rank's parameters: None for what no factory builds, and
    no optimizer for a rank without parameters (a stage of reshapes and activations has nothing
    to step), hence no scheduler either."""
    if optimizer_factory is None or not params:
        return None, None
    optimizer = optimizer_factory(params)
    scheduler = lr_scheduler_factory(optimizer) if lr_scheduler_factory is not None else None
    return optimizer, scheduler
