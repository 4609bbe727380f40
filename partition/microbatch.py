"""The micro-batch rule: a batch splits into ``m`` equal micro-batches along dimension 0.

One check of it (`check_divisible`) serves the planner, which traces the model on the first of
the ``m`` chunks of the example batch (`first_microbatch`), and the runtime, which splits every
step's batch (`pipeline.runtime.batch`); both raise the same `BatchError` with the same advice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_map

from partition.errors import BatchError

__all__ = ["DEFAULT_MICROBATCHES", "batch_size", "check_divisible", "first_microbatch"]

DEFAULT_MICROBATCHES = 4
"""Micro-batches per step when none are given: the planner, the partitioner and the command line."""


def batch_size(t: Any) -> int:
    """Dimension 0 of ``t``; raises `BatchError` for a non-tensor or a 0-d tensor."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        what = type(t).__name__ if not isinstance(t, torch.Tensor) else "Tensor of 0 dimensions"
        raise BatchError(
            f"every input and target must be a tensor with a batch dimension, got {what}"
        )
    return int(t.shape[0])


def check_divisible(batch: int, m: int) -> None:
    """Raise `BatchError`, with the batch sizes and micro-batch counts that would do, unless
    ``batch`` splits into ``m`` non-empty equal micro-batches."""
    if m < 1:
        raise BatchError(f"micro-batches must be at least 1, got {m}")
    if batch > 0 and batch % m == 0:
        return
    options = ", ".join(str(m * k) for k in range(1, 4))
    if batch == 0:
        raise BatchError(
            f"batch 0 is empty: it cannot be split into {m} micro-batches; use a batch of {options}…"
        )
    divisors = [d for d in range(1, batch + 1) if batch % d == 0]
    nearest = min(divisors, key=lambda d: (abs(d - m), -d))
    problem = (
        f"is smaller than {m} micro-batches (some would be empty)"
        if batch < m
        else f"is not divisible by {m} micro-batches"
    )
    raise BatchError(
        f"batch {batch} {problem}; use a batch of {options}… or --microbatches {nearest}"
    )


def first_microbatch(
    inputs: Sequence[Any], kwargs: Mapping[str, Any] | None, microbatches: int
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The first of ``microbatches`` equal chunks (dimension 0) of an example batch: what the
    planner traces and costs, since every stage runs one micro-batch at a time."""
    tensors = [t for t in [*inputs, *(kwargs or {}).values()] if isinstance(t, torch.Tensor)]
    sizes = {int(t.shape[0]) for t in tensors if t.dim() > 0}
    if len(sizes) > 1:
        raise BatchError(f"inputs disagree on the batch size (dimension 0): {sorted(sizes)}")
    if not sizes:
        if microbatches < 1:
            raise BatchError(f"micro-batches must be at least 1, got {microbatches}")
        return tuple(inputs), dict(kwargs or {})
    batch = sizes.pop()
    check_divisible(batch, microbatches)
    size = batch // microbatches

    def chunk(t: Any) -> Any:
        return t[:size] if isinstance(t, torch.Tensor) and t.dim() > 0 else t

    return tuple(tree_map(chunk, tuple(inputs))), dict(tree_map(chunk, dict(kwargs or {})))
