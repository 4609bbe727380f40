"""Gradient clipping by the global norm, across every rank of a pipeline.

[Note: the global norm]
The norm clipped is that of the whole model's gradient, as ``torch.nn.utils.clip_grad_norm_``
computes it in one process: every rank adds the squares of its parameters' gradient norms (in
float64), an all-reduce sums them, and every rank scales its gradients by the same
``max_norm / (norm + 1e-6)`` when that is below 1. A parameter held on several ranks (a tied
weight, see [Note: tied weights across ranks] in `pipeline.runtime.tied`) has one gradient,
summed, on each of them: it is counted on one rank only (``counted``), and scaled on all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from pipeline.parallel.fsdp import shard_of

__all__ = ["clip_grad_norm"]


def clip_grad_norm(
    params: Sequence[nn.Parameter],
    max_norm: float,
    *,
    counted: Sequence[nn.Parameter] | None = None,
    group: dist.ProcessGroup | None = None,
    device: torch.device | None = None,
) -> float:
    """Scale this rank's gradients so that the global norm is at most ``max_norm``; see
    [Note: the global norm]. A collective over ``group`` when a process group is initialised.

    Args:
        params: this rank's parameters, whose gradients are scaled (each once, however often
            listed).
        max_norm: the largest global norm left.
        counted: the parameters whose gradients make up this rank's share of the norm (default:
            ``params``); a tied weight whose norm another rank counts is left out
            (`pipeline.runtime.tied.TiedWeights.norm_params`).
        group: the ranks whose gradients make up the norm (default: the world).
        device: where the sum is reduced (a GPU under NCCL); default the first gradient's, else
            the CPU.

    Returns:
        The global norm before clipping.
    """
    once = _once(params if counted is None else counted)
    grads = [shard_of(p.grad).detach() for p in once if p.grad is not None]  # fsdp: shards
    if device is None:
        device = grads[0].device if grads else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    if grads:
        total += torch.stack([torch.linalg.vector_norm(g) for g in grads]).double().pow(2).sum()
    if dist.is_initialized():
        dist.all_reduce(total, group=group)
    norm = math.sqrt(float(total))
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for p in _once(params):
            if p.grad is not None:
                p.grad.mul_(coef)
    return norm


def _once(params: Sequence[nn.Parameter]) -> list[nn.Parameter]:
    """``params`` without repeats (a weight tied within a rank may be listed twice)."""
    return list({id(p): p for p in params}.values())
