"""One rank's job: what the launcher hands every rank (`RankJob`), the training loop it runs
(`run_rank`), and what it hands back (`RankResult`)."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from partition.errors import CheckpointError
from partition.plan import Plan
from pipeline.checkpoint.lock import FolderLock
from pipeline.launch.options import Checkpoints
from pipeline.parallel.data import global_loss, shard
from pipeline.parallel.fsdp import full
from pipeline.runtime.optim import OptimizerFactory
from pipeline.runtime.options import PipelineOptions
from pipeline.runtime.pipeline import ModelFactory, Pipeline

if TYPE_CHECKING:
    from pipeline.checkpoint.save_load import CheckpointInfo

__all__ = ["Batch", "RankJob", "RankResult", "TimedAction", "run_rank"]

log = logging.getLogger(__name__)

Batch = tuple[tuple[Any, ...] | dict[str, Any], Any]
"""``(inputs, target)``: the model's inputs for a whole batch (positional or by name), and the
loss function's target (None for a loss of the output alone)."""
TimedAction = tuple[int, str, float, float]
"""``(rank, action, start, end)``: one action of a step, ``time.monotonic()`` seconds."""


@dataclass(frozen=True, kw_only=True)
class RankJob:
    """Everything a rank needs to train, decided once by the launcher: picklable, the same on
    every rank (see [Note: one plan, made once] in `pipeline.runtime.layout`)."""

    factory: ModelFactory
    plan: Plan | None
    """The plan to build; None only under torchrun without one (the group's first rank plans)."""
    pipeline: PipelineOptions
    optimizer: OptimizerFactory
    steps: int
    batch: Batch
    """Every optimizer step trains on this (global) batch: with replicas or accumulation, each
    replica's step on its shard (see [Note: a replica's shard] in `pipeline.parallel.data`)."""
    accumulate: int = 1
    """Steps whose gradients add up before each optimizer step."""
    collect: bool = False
    """Send back every parameter, gradient and buffer (for ``--check``)."""
    checkpoints: Checkpoints | None = None


@dataclass(kw_only=True)
class RankResult:
    """What one rank did: its stages, each step's loss (None off the last stage) and time, where
    its weights came from, and (when collected) its tensors by the model's names."""

    rank: int
    """The global rank."""
    stages: list[int]
    microbatches: int
    losses: list[float | None]
    """Each optimizer step's loss of the global batch (every replica's, every accumulated
    step's), on the last stage's ranks."""
    times: list[float]
    """Seconds per step (NaN for steps done before a resume)."""
    timelines: list[list[TimedAction]]
    """Each step's actions, in order of the steps."""
    weights: list[str]
    """Where the rank's tensors came from: ``factory``, ``checkpoint``, ``init``."""
    resumed_from: int = 0
    replica: int = 0
    notes: list[str] = field(default_factory=list)
    """What the user should be told (a learning rate given now over the checkpoint's)."""
    params: dict[str, Tensor] = field(default_factory=dict)
    grads: dict[str, Tensor] = field(default_factory=dict)
    buffers: dict[str, Tensor] = field(default_factory=dict)


def run_rank(job: RankJob) -> RankResult:
    """Build this rank's part of the pipeline and train ``job.steps`` steps; a collective of the
    default process group. Rank 0 holds the checkpoint folder when the job says the lock is its
    (under torchrun), else knows that its launcher holds it; see [Note: one job per folder] in
    `pipeline.checkpoint.lock`."""
    with contextlib.ExitStack() as held:
        checkpoints = job.checkpoints
        if checkpoints is not None and dist.get_rank() == 0:
            lock = FolderLock(checkpoints.root, launcher_holds=not checkpoints.lock_here)
            held.enter_context(lock)
        return _train(job)


def _train(job: RankJob) -> RankResult:
    pipe = Pipeline(
        job.factory, plan=job.plan, options=job.pipeline, optimizer_factory=job.optimizer
    )
    # Each rank's random stream (dropout) from the seed, so that a run repeats, under torchrun
    # as on local ranks; a resume then restores the stream the checkpoint saved.
    torch.manual_seed(job.pipeline.seed * 1_000_003 + dist.get_rank() + 1)  # replicas differ
    checkpoints = job.checkpoints
    start = 0
    losses: list[float | None] = []
    notes: list[str] = []
    if checkpoints is not None and checkpoints.resume:
        start, losses, notes = _resume(
            pipe, checkpoints.root, job.optimizer.lr, job.pipeline.on_nonfinite
        )
    result = RankResult(
        rank=dist.get_rank(),
        replica=pipe.replica,
        stages=list(pipe.my_stages),
        microbatches=pipe.num_microbatches,
        losses=losses,
        times=[math.nan] * start,
        timelines=[[] for _ in range(start)],
        weights=sorted(set(pipe.weight_sources.values())),
        resumed_from=start,
        notes=notes,
    )
    for k in range(start, job.steps):
        began = time.monotonic()
        loss = _optimizer_step(pipe, job.batch, job.accumulate)
        result.times.append(time.monotonic() - began)
        result.losses.append(None if loss is None else float(loss))
        rank = result.rank  # the global rank: replicas share pipeline ranks
        result.timelines.append([(rank, str(a), s, e) for _, a, s, e in pipe.timeline])
        if checkpoints is not None and checkpoints.every and (k + 1) % checkpoints.every == 0:
            _save(pipe, checkpoints, result.losses)
    if pipe.nonfinite_steps:
        result.notes.append(_nonfinite_note(pipe.nonfinite_steps, job.pipeline.on_nonfinite))
    if job.collect:
        named = pipe.named_parameters()
        result.params = {n: full(p.detach()).cpu() for n, p in named.items()}  # fsdp: gathered
        result.grads = {n: full(p.grad).cpu() for n, p in named.items() if p.grad is not None}
        if pipe.dp == 1:
            result.buffers = {n: b.detach().cpu() for n, b in pipe.named_buffers().items()}
        else:  # as DDP with broadcast_buffers=False
            result.notes.append(
                f"buffers not compared: each of the {pipe.dp} replicas keeps its own (BatchNorm "
                "statistics of its own shards)"
            )
    return result


def _optimizer_step(pipe: Pipeline, batch: Batch, accumulate: int) -> Tensor | None:
    """One optimizer step on ``batch``: ``accumulate`` steps of this replica on its shards, the
    last reducing and stepping; the global batch's loss on the last stage's ranks."""
    parts = accumulate * pipe.dp
    losses = []
    for k in range(accumulate):
        inputs, target = shard(batch, k * pipe.dp + pipe.replica, parts) if parts > 1 else batch
        losses.append(pipe.step(inputs, target, accumulate=k < accumulate - 1))
    return global_loss(pipe, losses) if parts > 1 else losses[0]


def _save(pipe: Pipeline, checkpoints: Checkpoints, losses: list[float | None]) -> None:
    """A checkpoint after step ``pipe.steps_done``; the losses so far (from the last stage's
    rank, gathered) travel in it so that a resumed run reports every step."""
    from pipeline.checkpoint.save_load import save_checkpoint

    gathered: list[Any] = [None] * pipe.world_size
    dist.all_gather_object(gathered, losses, group=pipe.group)
    known = [next((g[k] for g in gathered if g[k] is not None), None) for k in range(len(losses))]
    save_checkpoint(
        pipe,
        checkpoints.root,
        data_position=pipe.steps_done,  # every step trains on the same batch
        extra={"losses": known},
        keep=checkpoints.keep,
    )


def _nonfinite_note(steps: list[int], policy: str) -> str:
    """The line that says which steps were not finite and what became of them (the same on
    every rank: they agree on every step; see [Note: non-finite steps])."""
    shown = ", ".join(map(str, steps[:10])) + (", ..." if len(steps) > 10 else "")
    done = "their updates were dropped" if policy == "skip" else "the optimizer stepped anyway"
    return (
        f"{len(steps)} step(s) had a non-finite loss or gradients (steps {shown}): {done} "
        f"(--on-nonfinite {policy})"
    )


def _apply_lr(pipe: Pipeline, lr: float) -> str | None:
    """The run's learning rate over the one the checkpoint restored: what the user passed now is
    what trains (``load_state_dict`` would keep the saved one, silently); returns the line that
    says so, if they differ."""
    if pipe.optimizer is None:
        return None
    saved = sorted({float(g["lr"]) for g in pipe.optimizer.param_groups})
    for group in pipe.optimizer.param_groups:
        group["lr"] = lr
    if saved == [lr]:
        return None
    note = (
        f"resuming with the learning rate given now, {lr:g} (the checkpoint's optimizer had "
        + ", ".join(f"{x:g}" for x in saved)
        + ")"
    )
    log.warning("rank %d: %s", pipe.rank, note)
    return note


def _check_loaded(pipe: Pipeline, info: CheckpointInfo, policy: str) -> list[str]:
    """Refuse (``on_nonfinite="stop"``) or note a resume from weights that are not finite, the
    same on every rank (a collective)."""
    gathered: list[Any] = [None] * pipe.world_size
    dist.all_gather_object(gathered, info.nonfinite, group=pipe.group)
    bad = [(r, names) for r, names in enumerate(gathered) if names]
    if not bad:
        return []
    r, names = bad[0]
    what = (
        f"{info.path} (step {info.step}) holds weights that are not finite (rank {r}: "
        f"{len(names)} tensor(s), the first {names[0]!r}): it was saved after the run diverged"
    )
    if policy == "stop":
        raise CheckpointError(
            f"{what}; resume from an older checkpoint (move {info.path.name} out of the folder), "
            "or start afresh without --resume (--on-nonfinite skip or warn resumes from it anyway)"
        )
    log.warning("rank %d: resuming from %s", pipe.rank, what)
    return [f"resumed from {what} (--on-nonfinite {policy})"]


def _resume(
    pipe: Pipeline, root: str, lr: float, policy: str
) -> tuple[int, list[float | None], list[str]]:
    """The step to start from, the losses before it and what the user should be told: 0 and
    none when ``root`` holds no complete checkpoint yet (each one skipped is logged with why)."""
    from pipeline.checkpoint.save_load import latest_complete, load_checkpoint

    found, skipped = latest_complete(root)
    for path, why in skipped:
        log.warning("rank %d: skipping checkpoint %s: %s", pipe.rank, path, why)
    if found is None:
        log.warning("rank %d: no complete checkpoint in %s; starting at step 0", pipe.rank, root)
        return 0, [], []
    info = load_checkpoint(pipe, found)
    notes = _check_loaded(pipe, info, policy)
    note = _apply_lr(pipe, lr)
    losses = list(info.extra.get("losses", [None] * info.step))
    mine = losses if pipe.is_last else [None] * len(losses)
    log.info("rank %d: resumed from %s at step %d", pipe.rank, found, info.step)
    return info.step, mine, notes + ([note] if note else [])
