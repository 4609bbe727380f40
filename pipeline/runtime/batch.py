"""A step's batch on one rank: checked against the plan before any message, split into
micro-batches, and the micro-batches' results put back together.

Every rank given the batch runs the same checks in the same order (so a bad batch fails on every
rank, before the first send): the inputs are the model's, one batch size throughout, divisible
into the micro-batches (`partition.microbatch.check_divisible`), each input of the plan's shape
and dtype. Only the rank of stage 0 keeps the input micro-batches, only the last rank the
target's. The inverse, on the last rank: `gather_outputs` concatenates the micro-batches'
outputs into the batch's, `reduce_losses` combines their losses into the batch's; see
[Note: loss scaling] in `pipeline.runtime.stage`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from partition.errors import BatchError
from partition.microbatch import batch_size, check_divisible
from partition.wires import TensorSpec

__all__ = ["BatchSplit", "gather_outputs", "reduce_losses", "split_batch", "tensors_in"]


@dataclass(frozen=True, kw_only=True)
class BatchSplit:
    """What a rank needs to know to check a step's batch and split it."""

    specs: tuple[TensorSpec, ...]
    """The model's inputs as the plan has them (one micro-batch each)."""
    microbatches: int
    """Micro-batches per step."""
    rank: int
    """This rank (named in the errors)."""
    first: bool
    """Whether this rank holds stage 0 (and keeps the input micro-batches)."""
    last: bool
    """Whether this rank holds the last stage (and keeps the target micro-batches)."""
    device: torch.device
    """Where the kept micro-batches go."""


def split_batch(
    inputs: Any, target: Any, split: BatchSplit, *, need_target: bool
) -> tuple[list[list[Tensor]] | None, list[Any] | None]:
    """``(input micro-batches, target micro-batches)`` for this rank; see the module docstring.

    Args:
        inputs: a tensor, a tuple of tensors, or a dict by the model's input names (or None).
        target: the loss function's target for the batch: a tensor or a (nested) tuple, list or
            dict of tensors (or None).
        split: this rank's part in the split.
        need_target: whether the loss needs a target (the last rank then requires one).

    Raises:
        BatchError: what is wrong, and what would do.
    """
    specs, m, rank, device = split.specs, split.microbatches, split.rank, split.device
    first, last = split.first, split.last
    names = [s.name for s in specs]
    if isinstance(inputs, Tensor):
        inputs = (inputs,)
    elif isinstance(inputs, dict):
        missing = [n for n in names if n not in inputs]
        if missing:
            raise BatchError(f"the inputs lack {missing}; the model's inputs are {names}")
        inputs = tuple(inputs[n] for n in names)
    if inputs is None and first:
        raise BatchError(f"rank {rank} holds stage 0 and needs the inputs; pass them to step()")
    if target is None and need_target and last:
        raise BatchError(
            f"rank {rank} holds the last stage and needs the target; pass it to step()"
        )
    sizes = []
    if inputs is not None:
        inputs = tuple(inputs)
        if len(inputs) != len(specs):
            raise BatchError(
                f"the model takes {len(specs)} input tensor(s) "
                f"({', '.join(s.describe() for s in specs)}), got {len(inputs)}"
            )
        sizes += [(f"input {s.name!r}", batch_size(t)) for s, t in zip(specs, inputs, strict=True)]
    if target is not None:
        sizes += [("target", batch_size(t)) for t in tensors_in(target)]
    batches = {b for _, b in sizes}
    if len(batches) > 1:
        raise BatchError(
            "inputs and target disagree on the batch size (dimension 0): "
            + ", ".join(f"{n} {b}" for n, b in sizes)
        )
    if batches:
        check_divisible(batches.pop(), m)
    mb_inputs = None
    if inputs is not None:
        for spec, t in zip(specs, inputs, strict=True):
            _check_spec(spec, t, m)
        if first:
            chunks = [t.to(device).tensor_split(m) for t in inputs]
            mb_inputs = [[c[i] for c in chunks] for i in range(m)]
    mb_targets = None
    if target is not None and last:
        mb_targets = [_chunk(target, m, i, device) for i in range(m)]
    return mb_inputs, mb_targets


def gather_outputs(outputs: Sequence[Any]) -> Any:
    """The batch's output from its micro-batches' (in order): each tensor concatenated along
    dimension 0, in whatever (nested) tuple, list or dict holds it; anything else is the first
    micro-batch's."""
    return tree_map(
        lambda *xs: torch.cat(xs) if isinstance(xs[0], Tensor) else xs[0],
        outputs[0],
        *outputs[1:],
    )


def reduce_losses(losses: Sequence[Tensor], reduction: Literal["mean", "sum"]) -> Tensor:
    """The batch's loss from its micro-batches' losses: their mean or their sum."""
    total = torch.stack(list(losses)).sum()
    return total / len(losses) if reduction == "mean" else total


def tensors_in(value: Any) -> list[Tensor]:
    """Every tensor in ``value`` (a tensor, or tuples, lists and dicts of them), in order."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_in(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_in(v)]
    return []


def _chunk(value: Any, m: int, i: int, device: torch.device) -> Any:
    """Micro-batch ``i`` of ``m`` of a tensor or a (nested) tuple, list or dict of tensors."""
    if isinstance(value, Tensor):
        return value.to(device).tensor_split(m)[i]
    if isinstance(value, (tuple, list)):
        return type(value)(_chunk(v, m, i, device) for v in value)
    if isinstance(value, dict):
        return {k: _chunk(v, m, i, device) for k, v in value.items()}
    return value


def _check_spec(spec: TensorSpec, t: Tensor, m: int) -> None:
    expected = (spec.shape[0] * m, *spec.shape[1:]) if spec.shape else ()
    if tuple(t.shape) != expected or t.dtype != spec.torch_dtype:
        got = f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
        raise BatchError(
            f"input {spec.name!r} is {got}; the plan's micro-batch is {spec.dtype}{list(spec.shape)}, "
            f"so {m} micro-batches make a batch of {spec.dtype}{list(expected)}; re-plan for this shape"
        )
