"""Launching a pipeline: `run_pipeline` plans once, builds the model once, and trains it on local
ranks (or in ``torchrun``'s group), then checks it against one process (`pipeline.launch.reference`).

The launcher decides everything the ranks share — the plan, the batch, the weights file — and
hands each rank one `pipeline.launch.job.RankJob`; see [Note: one plan, made once] in
`pipeline.runtime.layout`. The process harness is `pipeline.launch.spawn`, torchrun's group
`pipeline.launch.torchrun`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from partition.errors import BatchError, InputError, StageError
from partition.microbatch import batch_size, check_divisible
from partition.models.registry import BuiltModel, build_meta_model, target_free, unpack_model
from partition.modes.modal import describe_modes
from partition.plan import Plan
from pipeline.checkpoint.lock import FolderLock
from pipeline.launch.job import Batch, RankJob, RankResult, run_rank
from pipeline.launch.options import RunOptions
from pipeline.launch.reference import CheckResult, compare, run_reference
from pipeline.launch.results import RunResult, summarize
from pipeline.launch.spawn import spawn_ranks
from pipeline.launch.torchrun import run_under_torchrun, under_torchrun
from pipeline.parallel.data import shard
from pipeline.runtime.layout import plan_for
from pipeline.runtime.optim import OptimizerFactory
from pipeline.runtime.pipeline import ModelFactory
from pipeline.runtime.tensorfile import save_tensors
from pipeline.runtime.weights import build_eager, fits_in_host, model_bytes

__all__ = ["RunOptions", "run_pipeline"]

log = logging.getLogger(__name__)


def run_pipeline(
    model: str | ModelFactory,
    options: RunOptions | None = None,
    *,
    plan: Plan | str | Path | None = None,
) -> RunResult | None:
    """Train ``model`` for ``steps`` steps on ``ranks`` local processes (or in ``torchrun``'s group).

    Locally, the model is built for real once, here (``torch.manual_seed(seed)``, then the
    factory), when it fits in host memory: its tensors go to the ranks through a temporary file
    (see [Note: the model's own weights] in `pipeline.runtime.weights`) and its own example
    inputs and target are the batch. Under torchrun the ranks build it once per machine, and the
    batch is synthetic (shaped like the example).

    Args:
        model: a factory, a ``package.module:callable`` string, or a bundled name (``gpt``).
        options: see `RunOptions` (and its ``pipeline``, a `PipelineOptions`).
        plan: a `Plan` or a plan file; without one, the model is planned here, once, with the
            options' schedule, micro-batches and bounds (under torchrun: by rank 0).

    With ``checkpoint_dir``, the ranks save every ``checkpoint_every`` steps and, with ``resume``
    (or after a restart), start from the newest complete checkpoint; see `pipeline.checkpoint`.

    Returns:
        The run (see `RunResult`; ``check`` only when asked), or None on a torchrun rank other
        than 0.

    Raises:
        StageError: a rank failed; the message has every rank's outcome and the first failure's
            traceback.
    """
    run = options or RunOptions()
    pipe_options = run.pipeline
    if isinstance(plan, (str, Path)):
        plan = Plan.load(plan)
    factory = _factory(model, run.size, run.batch, run.seq)
    torchrun = under_torchrun()
    meta = build_meta_model(factory, cpu_fallback=pipe_options.weights != "init")
    eager = _eager(factory, run, meta) if not torchrun else None
    batch = _synthetic(eager or meta, pipe_options.seed + 1)
    parts = run.accumulate * (pipe_options.dp or 1)
    _check_shards(batch, pipe_options.microbatches, run)  # at once, not on every rank later
    if plan is None and (not torchrun or parts > 1):  # see [Note: one plan, made once]
        # a step trains on one shard: the plan's micro-batches are a shard's
        plan = plan_for(_shard_example(meta, parts), pipe_options, run.pp_ranks)
    if plan is not None:
        _check_shards(batch, plan.microbatches, run)
    with contextlib.ExitStack() as cleanup:
        if run.checkpoint_dir is not None and not torchrun:  # see [Note: one job per folder]
            cleanup.enter_context(FolderLock(run.checkpoint_dir))
        weights_file = None
        if eager is not None and pipe_options.weights != "init":
            folder = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="pipepart-"))
            weights_file = str(Path(folder) / "factory.safetensors")
            save_tensors(eager.model, weights_file)
        job = RankJob(
            factory=factory,
            plan=plan,
            pipeline=dataclasses.replace(pipe_options, factory_weights=weights_file),
            optimizer=OptimizerFactory(run.optimizer, run.lr),
            steps=run.steps,
            batch=batch,
            accumulate=run.accumulate,
            collect=run.check,
            checkpoints=run.checkpoints,
        )
        if torchrun:
            results = _torchrun_results(job, run)
            if results is None:
                return None
            restarted = 0
        else:
            results, restarted = _spawn_with_restarts(job, run)
            if restarted:
                log.warning("ranks restarted %d time(s)", restarted)
    result = summarize(results, run.steps, restarted)
    if plan is not None:  # which modes were traced and planned, as `pipepart plan` says
        result.notes.insert(0, describe_modes(plan.model.modes))
    if run.check:
        if eager is None:  # under torchrun: rank 0 builds the reference now
            eager = unpack_model(build_eager(factory, pipe_options.seed))
        result.check = _check(results, eager, job, run.check_tol)
    return result


def _eager(factory: ModelFactory, run: RunOptions, meta: BuiltModel) -> BuiltModel | None:
    """The model built for real here, when the check, the weights or the batch need it."""
    options = run.pipeline
    needed = (
        run.check
        or options.weights == "factory"
        or (
            options.weights == "auto"
            and options.checkpoint is None
            and fits_in_host(model_bytes(meta.model))
        )
    )
    return unpack_model(build_eager(factory, options.seed)) if needed else None


def _torchrun_results(job: RankJob, run: RunOptions) -> list[RankResult] | None:
    """Every rank's result on rank 0 (None elsewhere); ``torchrun --max-restarts`` starts us
    again after a failure, so resume when there is a save."""
    checkpoints = job.checkpoints
    if checkpoints is not None:
        resume = run.resume or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        checkpoints = dataclasses.replace(checkpoints, resume=resume, lock_here=True)
        job = dataclasses.replace(job, checkpoints=checkpoints)
    return run_under_torchrun(job, run.timeout, run.backend)


def _factory(model: str | ModelFactory, size: str, batch: int, seq: int | None) -> ModelFactory:
    if callable(model):
        return model
    from partition.models.registry import resolve

    return _SpecFactory(resolve(model, size=size, batch=batch, seq=seq))


@dataclass(frozen=True)
class _SpecFactory:
    """A picklable factory for a registry model spec."""

    spec: Any

    def __call__(self) -> Any:
        return self.spec.build()


def _synthetic(built: BuiltModel, seed: int) -> Batch:
    """A batch and target shaped like the factory's example: the example itself when the factory
    built real tensors, else (a meta build) normal floats and integers in ``[0, vocab_size)``
    when the model has a ``config.vocab_size``, else in ``[0, 2)``."""
    vocab = int(getattr(getattr(built.model, "config", None), "vocab_size", 2))
    generator = torch.Generator().manual_seed(seed)

    def make(t: Any) -> Any:
        if not isinstance(t, Tensor) or t.device.type != "meta":
            return t
        if t.dtype.is_floating_point:
            return torch.randn(t.shape, generator=generator).to(t.dtype)
        if t.dtype == torch.bool:
            return torch.ones(t.shape, dtype=torch.bool)
        return torch.randint(0, vocab, t.shape, generator=generator, dtype=t.dtype)

    args = tuple(make(t) for t in built.args or ())
    kwargs = {k: make(t) for k, t in built.kwargs.items() if isinstance(t, Tensor)}
    target = make(built.target) if built.target is not None else None
    if target is None and not target_free(built.loss_fn):
        raise InputError(
            "the model factory gives a loss_fn(output, target) but no target to train against; "
            "return (model, inputs, loss_fn, target), or a loss_fn(output) of the output alone"
        )
    if kwargs:  # keyword inputs (input_ids=..., attention_mask=...) go by name
        if args:
            names = list(inspect.signature(built.model.forward).parameters)
            kwargs = {**dict(zip(names, args, strict=False)), **kwargs}
        return kwargs, target
    return args, target


def _spawn_with_restarts(job: RankJob, run: RunOptions) -> tuple[list[RankResult], int]:
    """The local ranks' results, starting every rank again (resuming from the newest complete
    checkpoint) up to ``run.restarts`` times when one fails — but not for a step that was not
    finite, which the same checkpoint would reach again; and how many restarts it took."""
    for attempt in range(run.restarts + 1):
        if job.checkpoints is not None and attempt > 0:
            job = dataclasses.replace(
                job, checkpoints=dataclasses.replace(job.checkpoints, resume=True)
            )
        outcomes = spawn_ranks(
            run_rank,
            run.ranks,
            (job,),
            timeout=run.timeout * 2 + 60,
            pg_timeout=run.timeout,
            backend=run.backend,
            start_method="forkserver",
        )
        failed = [o for o in outcomes if not o.ok]
        if not failed:
            return [o.value for o in outcomes], attempt
        first_failure = min(failed, key=lambda o: (bool(o.killed), o.elapsed))
        report = "\n".join(o.describe() for o in outcomes)
        if "NonFiniteError" in first_failure.error_types and attempt < run.restarts:
            # a restart resumes from the newest checkpoint and diverges at the same step again
            log.warning(
                "not restarting: a step was not finite, and would be again from the same checkpoint"
            )
        elif attempt < run.restarts:
            log.warning(
                "a rank failed; restarting every rank (%d left):\n%s",
                run.restarts - attempt,
                report,
            )
            continue
        raise StageError(f"{report}\n--- rank {first_failure.rank} ---\n{first_failure.traceback}")
    raise AssertionError("unreachable")


def _shard_example(built: BuiltModel, parts: int) -> BuiltModel:
    """The factory's example cut to one shard of ``parts`` (what one step of one replica
    trains on); see [Note: a replica's shard] in `pipeline.parallel.data`."""
    if parts == 1:
        return built
    return dataclasses.replace(
        built,
        args=shard(built.args, 0, parts) if built.args is not None else None,
        kwargs=shard(built.kwargs, 0, parts),
    )


def _check_shards(batch: Batch, m: int | None, run: RunOptions) -> None:
    """Raise `BatchError` unless the batch splits into ``accumulate * dp`` shards of ``m``
    micro-batches each (of any number when ``m`` is None); see [Note: a replica's shard] in
    `pipeline.parallel.data`."""
    inputs = batch[0]
    first = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs[0]
    rows, parts = batch_size(first), run.accumulate * (run.pipeline.dp or 1)
    if parts == 1:
        if m is not None:
            check_divisible(rows, m)
        return
    m = m or 1
    if rows == 0 or rows % (parts * m):
        raise BatchError(
            f"a batch of {rows} rows does not split into {parts} shards ({run.accumulate} "
            f"accumulation steps x {run.pipeline.dp or 1} replicas) of {m} micro-batches each; "
            f"use --batch {parts * m}, {2 * parts * m}…, or change --accumulate, --dp or "
            "--microbatches"
        )


def _check(
    results: list[RankResult], eager: BuiltModel, job: RankJob, tolerance: float
) -> CheckResult:
    """Train the factory's own model here the plain way, on the global batch (the shards of
    every replica and accumulated step, in order); see [Note: an independent check]."""
    loss_fn = eager.loss_fn
    assert loss_fn is not None
    parts = job.accumulate * (job.pipeline.dp or 1)
    reference = run_reference(
        eager.model,
        loss_fn,
        job.batch,
        microbatches=results[0].microbatches * parts,
        steps=job.steps,
        optimizer_factory=job.optimizer,
        semantics=job.pipeline,
    )
    return compare(results, reference, tolerance=tolerance)
