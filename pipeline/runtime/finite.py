"""Non-finite steps: every rank learns that a step's loss or gradients are not finite, and the
pipeline stops, drops the step's update, or warns (``PipelineOptions.on_nonfinite``).

[Note: non-finite steps]
One NaN or inf in a loss or a gradient poisons every weight the optimizer touches next: a run
that goes on trains NaN and publishes it. The loss lives on the last stage and each rank holds
only its own gradients, so after the backward (and the tied weights' sum, before clipping) every
rank reduces one flag with one all-reduce of one number over the pipeline's group, and every rank
reaches the same verdict. A gradient is checked through its largest absolute element
(``vector_norm(g, ord=inf)``: one reduction per tensor, no copy; NaN and inf propagate, a huge
finite value does not overflow as a 2-norm would). Only a step found non-finite gathers each
rank's description (the loss, each stage's non-finite gradients and the first of them): one
more collective on that step alone. Then ``on_nonfinite`` decides, the same on every rank:

- ``"stop"`` (default): `NonFiniteError` on every rank, naming the step, the stages and the first
  tensor of each, raised before the optimizer steps: the weights stay those the step started from.
- ``"skip"``: the step's update is dropped on every rank (gradients cleared, no optimizer or LR
  scheduler step), as a mixed-precision grad scaler drops an overflowing step.
- ``"warn"``: a warning, and the optimizer steps anyway.

``"skip"`` and ``"warn"`` record the step in ``Pipeline.nonfinite_steps``. A checkpoint is never
published with non-finite weights (`pipeline.checkpoint.write`), whatever ``on_nonfinite`` says.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from partition.errors import NonFiniteError
from pipeline.parallel.fsdp import shard_of

if TYPE_CHECKING:
    from pipeline.runtime.stage import StageExecutor

__all__ = ["ON_NONFINITE", "OnNonFinite", "decide", "find_nonfinite", "nonfinite_names"]

log = logging.getLogger(__name__)

OnNonFinite = Literal["stop", "skip", "warn"]
"""What a step whose loss or gradients are not finite does; see [Note: non-finite steps]."""
ON_NONFINITE: tuple[OnNonFinite, ...] = ("stop", "skip", "warn")

_FLAGS: dict[torch.device, Tensor] = {}
"""The flag reduced each step, one per device and reused: a tensor given to a collective can be
held by the backend a while after it returns, and a new one per step would show as a tensor
alive after the step (`tests/pipeline/test_steady.py` counts them)."""

Checked = tuple[int, str, Tensor]
"""``(stage, name, parameter)``: a parameter whose gradient is checked, by its model name."""


def _max_abs(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """The largest absolute element of ``tensors`` (NaN or inf if any is), as a 0-d float32."""
    tensors = [t for t in tensors if t.numel()]  # a shard may be empty
    if not tensors:
        return torch.zeros((), device=device)
    with torch.no_grad():  # one foreach call, not a norm per tensor: a per-step cost
        norms = list(torch._foreach_norm(tensors, float("inf")))
    if len({n.dtype for n in norms}) > 1:
        norms = [n.float() for n in norms]
    return torch.stack(norms).max().float()


def nonfinite_names(named: Iterable[tuple[str, Tensor]]) -> list[str]:
    """The names of the floating-point tensors holding an element that is not finite (one
    reduction per tensor, one transfer per device)."""
    floats = [(n, t.detach()) for n, t in named if t.is_floating_point() and t.numel()]
    bad: set[str] = set()
    for device in {t.device for _, t in floats}:
        here = [(n, t) for n, t in floats if t.device == device]
        norms = torch.stack(
            [torch.linalg.vector_norm(t, ord=float("inf")).float() for _, t in here]
        )
        bad.update(
            n for (n, _), ok in zip(here, torch.isfinite(norms).tolist(), strict=True) if not ok
        )
    return [n for n, _ in floats if n in bad]


@dataclass(frozen=True)
class _RankReport:
    """What one rank saw in a non-finite step."""

    rank: int
    loss: tuple[int, str, int, int] | None
    """``(stage, loss, non-finite micro-batches, micro-batches)`` on the last stage's rank."""
    grads: tuple[tuple[int, int, str], ...]
    """``(stage, non-finite gradients, the first one's name)`` for each stage with any."""


def find_nonfinite(
    executors: Mapping[int, StageExecutor],
    names: Mapping[int, str],
    *,
    group: dist.ProcessGroup | None,
    device: torch.device,
) -> str | None:
    """``None`` when this step's loss and gradients are finite on every rank of ``group``, else
    what is not, the same text on every rank; a collective. See [Note: non-finite steps].

    Args:
        executors: this rank's stages (the last one's holds the micro-batch losses).
        names: a parameter's model name by its ``id``.
    """
    checked = [
        (s, names.get(id(p), "?"), p) for s, e in sorted(executors.items()) for p in e.parameters
    ]
    last = next((s for s, e in executors.items() if e.stage.is_last), None)
    losses = executors[last].losses if last is not None else []
    grads = [shard_of(p.grad) for _, _, p in checked if p.grad is not None]  # fsdp: shards
    local = torch.stack([_max_abs(losses, device), _max_abs(grads, device)]).max()
    flag = _FLAGS.setdefault(device, torch.zeros(1, device=device))
    flag.copy_(torch.where(torch.isfinite(local), 0.0, 1.0).reshape(1))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if float(flag) == 0.0:
        return None
    mine = _report(losses, checked, last, dist.get_rank(group))
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    return _describe(gathered)


def _report(
    losses: Sequence[Tensor], checked: Sequence[Checked], last_stage: int | None, rank: int
) -> _RankReport:
    loss = None
    bad = [i for i, t in enumerate(losses) if not math.isfinite(float(t))]
    if bad and last_stage is not None:
        value = float(torch.stack([t.detach().float() for t in losses]).mean())
        loss = (last_stage, f"{value}", len(bad), len(losses))
    by_stage: dict[int, list[str]] = {}
    for stage, name, p in checked:
        if p.grad is not None and nonfinite_names([(name, shard_of(p.grad))]):
            by_stage.setdefault(stage, []).append(name)
    grads = tuple((s, len(names), names[0]) for s, names in sorted(by_stage.items()))
    return _RankReport(rank, loss, grads)


def _describe(reports: Sequence[_RankReport]) -> str:
    """``the loss is nan on stage 3 (rank 1, 4 of 4 micro-batches); gradients not finite on
    stage 0 (rank 0: 12 tensors, the first 'h.0.attn.weight')``."""
    parts = [
        f"the loss is {value} on stage {stage} (rank {r.rank}, {bad} of {total} micro-batches)"
        for r in reports
        if r.loss is not None
        for stage, value, bad, total in [r.loss]
    ]
    stages = sorted((s, r.rank, n, first) for r in reports for s, n, first in r.grads)
    if stages:
        parts.append(
            "gradients not finite on "
            + ", ".join(
                f"stage {s} (rank {rank}: {n} tensor{'s' if n > 1 else ''}, the first {first!r})"
                for s, rank, n, first in stages
            )
        )
    return "; ".join(parts) or "a loss or gradient is not finite"


def decide(found: str | None, policy: OnNonFinite, *, rank: int, step: int) -> bool:
    """Whether the step may update its weights: yes when ``found`` is None (all finite);
    ``policy`` says otherwise (see [Note: non-finite steps]), the same on every rank.

    Raises:
        NonFiniteError: ``policy`` is ``"stop"``; names the step, what is not finite, the ways on.
    """
    if found is None:
        return True
    if policy == "stop":
        raise NonFiniteError(
            f"[rank {rank} · step {step}] not finite: {found}. Stopped before the optimizer "
            f"step, so the weights are those step {step} started from. Lower the learning rate "
            "(--lr), clip gradients (--clip, max_grad_norm=), or pass --on-nonfinite skip "
            "(on_nonfinite='skip') to drop such a step's update, or warn to train on"
        )
    then = "its update is dropped" if policy == "skip" else "training on (on_nonfinite='warn')"
    log.warning("[rank %d · step %d] not finite: %s; %s", rank, step, found, then)
    return policy == "warn"
