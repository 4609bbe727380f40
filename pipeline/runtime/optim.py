"""Optimizers by name: the one table the command line and the launcher share; the planner prices
them under the same names (`partition.memory.OPTIMIZER_STATES`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from partition.errors import InputError

__all__ = ["OPTIMIZER_CLASSES", "OptimizerFactory"]

OPTIMIZER_CLASSES: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}
"""``--optimizer NAME`` -> the optimizer class, built with ``lr`` and its defaults otherwise."""


@dataclass(frozen=True)
class OptimizerFactory:
    """A picklable ``optimizer_factory(params)`` for an optimizer of `OPTIMIZER_CLASSES`."""

    name: str
    lr: float

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZER_CLASSES:
            raise InputError(
                f"unknown optimizer {self.name!r}; choose one of {', '.join(OPTIMIZER_CLASSES)}"
            )

    def __call__(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return OPTIMIZER_CLASSES[self.name](params, lr=self.lr)
