"""Optimizers by name: the one table the command line and the launcher share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from partition.errors import InputError

__all__ = ["OPTIMIZERS", "OptimizerFactory"]

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}
"""``--optimizer NAME`` -> the optimizer class, built with ``lr`` and its defaults otherwise."""


@dataclass(frozen=True)
class OptimizerFactory:
    """A picklable ``optimizer_factory(params)`` for an optimizer of `OPTIMIZERS`."""

    name: str
    lr: float

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise InputError(
                f"unknown optimizer {self.name!r}; choose one of {', '.join(OPTIMIZERS)}"
            )

    def __call__(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return OPTIMIZERS[self.name](params, lr=self.lr)
