"""Launching a pipeline: train on local ranks (or join ``torchrun``'s), run steps, check against
one process (`pipeline.launch.reference`). The process harness is `pipeline.launch.spawn`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import inspect
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from partition.errors import InputError, StageError
from partition.microbatch import batch_size, check_divisible
from partition.models.registry import BuiltModel, build_meta_model, target_free, unpack_model
from partition.plan import Plan
from pipeline.launch.reference import DEFAULT_TOLERANCE, compare, run_reference
from pipeline.launch.spawn import spawn_ranks
from pipeline.runtime.optim import OptimizerFactory
from pipeline.runtime.pipeline import ModelFactory, Pipeline, PipelineOptions
from pipeline.runtime.tensorfile import save_tensors
from pipeline.runtime.weights import build_eager, fits_in_host, model_bytes

__all__ = ["RunOptions", "run_pipeline"]

log = logging.getLogger(__name__)


# --- run_pipeline -------------------------------------------------------------------------------


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


def _synthetic(built: BuiltModel, seed: int) -> tuple[tuple[Any, ...] | dict[str, Any], Any]:
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


@dataclass(frozen=True)
class _Checkpoints:
    """Where and how often the ranks save, and whether they start from the newest save."""

    root: str
    every: int | None
    keep: int | None
    resume: bool


def _rank_run(
    factory: ModelFactory,
    plan: Plan | None,
    options: PipelineOptions,
    optimizer: str,
    lr: float,
    steps: int,
    inputs: tuple[Any, ...] | dict[str, Any],
    target: Any,
    collect: bool,
    checkpoints: _Checkpoints | None = None,
) -> dict[str, Any]:
    pipe = Pipeline(
        factory, plan=plan, options=options, optimizer_factory=OptimizerFactory(optimizer, lr)
    )
    # Each rank's random stream (dropout) from the seed, so that a run repeats, under torchrun
    # as on local ranks; a resume then restores the stream the checkpoint saved.
    torch.manual_seed(options.seed * 1_000_003 + pipe.rank + 1)
    losses: list[float | None] = []
    times: list[float] = []
    timelines: list[Any] = []
    start = 0
    if checkpoints is not None and checkpoints.resume:
        start, losses = _resume(pipe, checkpoints.root)
        times = [math.nan] * start
        timelines = [[] for _ in range(start)]
    for k in range(start, steps):
        began = time.monotonic()
        loss = pipe.step(inputs, target)
        times.append(time.monotonic() - began)
        losses.append(None if loss is None else float(loss))
        timelines.append([(r, str(a), s, e) for r, a, s, e in pipe.timeline])
        if checkpoints is not None and checkpoints.every and (k + 1) % checkpoints.every == 0:
            _save(pipe, checkpoints, losses)
    out: dict[str, Any] = {
        "rank": pipe.rank,
        "stages": list(pipe.my_stages),
        "microbatches": pipe.num_microbatches,
        "losses": losses,
        "times": times,
        "weights": sorted(set(pipe.weight_sources.values())),
        "resumed_from": start,
    }
    out["timelines"] = timelines
    if collect:
        named = pipe.named_parameters()
        out["params"] = {n: p.detach().cpu() for n, p in named.items()}
        out["grads"] = {n: p.grad.detach().cpu() for n, p in named.items() if p.grad is not None}
        out["buffers"] = {n: b.detach().cpu() for n, b in pipe.named_buffers().items()}
    return out


def _save(pipe: Pipeline, checkpoints: _Checkpoints, losses: list[float | None]) -> None:
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


def _resume(pipe: Pipeline, root: str) -> tuple[int, list[float | None]]:
    """The step to start from and the losses before it: 0 and none when ``root`` holds no
    complete checkpoint yet (each one skipped is logged with why)."""
    from pipeline.checkpoint.save_load import latest_complete, load_checkpoint

    found, skipped = latest_complete(root)
    for path, why in skipped:
        log.warning("rank %d: skipping checkpoint %s: %s", pipe.rank, path, why)
    if found is None:
        log.warning("rank %d: no complete checkpoint in %s; starting at step 0", pipe.rank, root)
        return 0, []
    info = load_checkpoint(pipe, found)
    losses = list(info.extra.get("losses", [None] * info.step))
    mine = losses if pipe.is_last else [None] * len(losses)
    log.info("rank %d: resumed from %s at step %d", pipe.rank, found, info.step)
    return info.step, mine


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """How `run_pipeline` trains: where, how long, the optimizer and the check. How the pipeline
    itself runs (schedule, micro-batches, weights, ...) is ``pipeline``, a `PipelineOptions`."""

    ranks: int = 2
    """Local processes to spawn (under torchrun: the world size it started)."""
    steps: int = 1
    """Optimizer steps, each over the same batch."""
    optimizer: str = "sgd"
    """A name in `pipeline.runtime.optim.OPTIMIZERS`."""
    lr: float = 1e-3
    check: bool = False
    """Also train the factory's own model in this process and compare; see [Note: an
    independent check] in `pipeline.launch.reference`."""
    check_tol: float = DEFAULT_TOLERANCE
    """The largest relative difference the check accepts."""
    timeout: float = 300.0
    """Seconds a rank waits for a peer (the process group's timeout)."""
    backend: str | None = None
    """``gloo`` or ``nccl``; default NCCL with a GPU per rank, else gloo."""
    size: str = ""
    """For a bundled or ``hf:`` model name: its size (``toy``, ``small``, ``tiny``, ``real``...)."""
    batch: int = 8
    """For a bundled or ``hf:`` model name: the batch its example has."""
    seq: int | None = None
    """For a bundled or ``hf:`` model name: the sequence length."""
    pipeline: PipelineOptions = field(default_factory=PipelineOptions)
    checkpoint_dir: str | Path | None = None
    """Where the ranks save checkpoints (``step-N`` directories; see `pipeline.checkpoint.save_load`)."""
    checkpoint_every: int | None = None
    """Save after every this many steps (needs ``checkpoint_dir``)."""
    keep: int | None = None
    """Keep only the newest ``keep`` complete checkpoints (never deleting the only one)."""
    resume: bool = False
    """Start from the newest complete checkpoint in ``checkpoint_dir`` (from step 0 if none)."""
    restarts: int = 0
    """Local ranks only: when a rank dies, start every rank again this many times, resuming
    from the newest complete checkpoint (under torchrun, its ``--max-restarts`` does this)."""

    def __post_init__(self) -> None:
        for name in ("ranks", "steps", "batch"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise InputError(f"lr must be positive, got {self.lr}")
        if not self.check_tol > 0:
            raise InputError(f"check_tol must be positive, got {self.check_tol}")
        if not self.timeout > 0:
            raise InputError(f"timeout must be positive, got {self.timeout}")
        OptimizerFactory(self.optimizer, self.lr)  # an unknown name fails here
        for name in ("checkpoint_every", "keep"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"{name} must be at least 1, got {value}")
        if self.restarts < 0:
            raise InputError(f"restarts must be at least 0, got {self.restarts}")
        needs_dir = [
            flag
            for flag, given in (
                ("checkpoint_every", self.checkpoint_every is not None),
                ("keep", self.keep is not None),
                ("resume", self.resume),
                ("restarts", self.restarts > 0),
            )
            if given
        ]
        if needs_dir and self.checkpoint_dir is None:
            raise InputError(
                f"{', '.join(needs_dir)} need checkpoint_dir (--checkpoint-dir DIR): that is "
                "where checkpoints are saved and resumed from"
            )


def run_pipeline(
    model: str | ModelFactory,
    options: RunOptions | None = None,
    *,
    plan: Plan | str | Path | None = None,
) -> dict[str, Any]:
    """Train ``model`` for ``steps`` steps on ``ranks`` local processes (or in ``torchrun``'s group).

    Locally, the model is built for real once, here (``torch.manual_seed(seed)``, then the
    factory), when it fits in host memory: its tensors go to the ranks through a temporary file
    (see [Note: the model's own weights] in `pipeline.runtime.weights`) and its own example inputs and
    target are the batch. Under torchrun the ranks build it once per machine, and the batch is
    synthetic (shaped like the example).

    Args:
        model: a factory, a ``package.module:callable`` string, or a bundled name (``gpt``).
        options: see `RunOptions` (and its ``pipeline``, a `PipelineOptions`).
        plan: a `Plan` or a plan file; without one, the options' schedule and micro-batches are
            used and the partitioner splits the model.

    With ``checkpoint_dir``, the ranks save every ``checkpoint_every`` steps and, with ``resume``
    (or after a restart), start from the newest complete checkpoint; see `pipeline.checkpoint.save_load`.

    Returns:
        ``{"ranks", "stages", "weights", "restarts", "resumed_from", "steps": [{"step", "time",
        "loss"}], "timeline" (the
        last step's ``(rank, action, start, end)`` from every rank, seconds from its start),
        "check"}`` (``check`` only when asked: see `pipeline.launch.reference.compare`).

    Raises:
        StageError: a rank failed; the message has every rank's outcome and the first failure's
            traceback.
    """
    run = options or RunOptions()
    pipe_options = run.pipeline
    steps, check, seed, weights = run.steps, run.check, pipe_options.seed, pipe_options.weights
    if isinstance(plan, (str, Path)):
        plan = Plan.load(plan)
    factory = _factory(model, run.size, run.batch, run.seq)
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    meta = build_meta_model(factory)
    eager: BuiltModel | None = None
    if not torchrun and (
        check
        or weights == "factory"
        or (
            weights == "auto"
            and pipe_options.checkpoint is None
            and fits_in_host(model_bytes(meta.model))
        )
    ):
        eager = unpack_model(build_eager(factory, seed))
    inputs, target = _synthetic(eager or meta, seed + 1)
    m = pipe_options.microbatches or (plan.microbatches if plan is not None else None)
    if m:  # fail here, at once, rather than on every rank after start-up
        first = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs[0]
        check_divisible(batch_size(first), m)
    with contextlib.ExitStack() as cleanup:
        weights_file = None
        if eager is not None and weights != "init":
            folder = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="pipepart-"))
            weights_file = str(Path(folder) / "factory.safetensors")
            save_tensors(eager.model, weights_file)
        ranks_options = dataclasses.replace(pipe_options, factory_weights=weights_file)
        checkpoints = (
            _Checkpoints(str(run.checkpoint_dir), run.checkpoint_every, run.keep, run.resume)
            if run.checkpoint_dir is not None
            else None
        )
        restarted = 0
        common = (factory, plan, ranks_options, run.optimizer, run.lr, steps, inputs, target)
        if torchrun:  # torchrun --max-restarts starts us again: resume when there is a save
            resume = checkpoints is not None and (
                run.resume or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
            )
            again = dataclasses.replace(checkpoints, resume=resume) if checkpoints else None
            results = _under_torchrun((*common, check, again), run.timeout, run.backend)
            if results is None:
                return {}
        else:
            results, restarted = _spawn_with_restarts(run, common, check, checkpoints)
            if restarted:
                log.warning("ranks restarted %d time(s)", restarted)
    summary = _summary(results, steps)
    summary["restarts"] = restarted
    summary["resumed_from"] = min(r["resumed_from"] for r in results)
    if check:
        if eager is None:  # under torchrun: rank 0 builds the reference now
            eager = unpack_model(build_eager(factory, seed))
        summary["check"] = _check(
            results,
            eager,
            pipe_options,
            run.optimizer,
            run.lr,
            steps,
            inputs,
            target,
            run.check_tol,
        )
    return summary


def _spawn_with_restarts(
    run: RunOptions,
    common: tuple[Any, ...],
    check: bool,
    checkpoints: _Checkpoints | None,
) -> tuple[list[dict[str, Any]], int]:
    """The local ranks' results, starting every rank again (resuming from the newest complete
    checkpoint) up to ``run.restarts`` times when one fails; and how many restarts it took."""
    for attempt in range(run.restarts + 1):
        again = checkpoints
        if checkpoints is not None and attempt > 0:
            again = dataclasses.replace(checkpoints, resume=True)
        outcomes = spawn_ranks(
            _rank_run,
            run.ranks,
            (*common, check, again),
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
        if attempt < run.restarts:
            log.warning(
                "a rank failed; restarting every rank (%d left):\n%s",
                run.restarts - attempt,
                report,
            )
            continue
        raise StageError(f"{report}\n--- rank {first_failure.rank} ---\n{first_failure.traceback}")
    raise AssertionError("unreachable")


def _init_torchrun_group(backend: str, timeout: datetime.timedelta) -> None:
    """``init_process_group`` from torchrun's environment, in a store namespace of its own per
    restart.

    [Note: one store namespace per restart]
    After ``torchrun --max-restarts`` starts the ranks again, the rendezvous store can still hold
    the addresses the dead attempt's ranks published (torch assumes a fresh store per attempt,
    and the standalone agent's store outlives it), so a new rank may dial a port nobody listens
    on any more and time out. Prefixing the keys with ``TORCHELASTIC_RESTART_COUNT`` keeps each
    attempt's addresses apart.
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or "MASTER_ADDR" not in os.environ:
        dist.init_process_group(backend, timeout=timeout)
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=not agent_store and rank == 0,
        timeout=timeout,
        multi_tenant=not agent_store,
    )
    prefixed = dist.PrefixStore(f"pipepart/restart-{restart}", store)
    dist.init_process_group(backend, store=prefixed, rank=rank, world_size=world, timeout=timeout)


def _under_torchrun(
    args: tuple[Any, ...], timeout: float, backend: str | None
) -> list[dict[str, Any]] | None:
    """Join ``torchrun``'s process group, run, and gather the results on rank 0 (None elsewhere)."""
    created = not dist.is_initialized()
    if created:
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        _init_torchrun_group(backend, datetime.timedelta(seconds=timeout))
    result = _rank_run(*args)  # on failure, raise: torchrun then stops the other ranks
    root = dist.get_rank() == 0
    gathered: list[Any] = [None] * dist.get_world_size() if root else []
    dist.gather_object(result, gathered if root else None, dst=0)
    if created:
        dist.destroy_process_group()
    return gathered if root else None


def _summary(results: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    by_step = []
    for k in range(steps):
        losses = [r["losses"][k] for r in results if r["losses"][k] is not None]
        by_step.append(
            {
                "step": k,
                "time": max(r["times"][k] for r in results),
                "loss": losses[0] if losses else None,
            }
        )
    events = [e for r in results for e in r["timelines"][-1]]
    t0 = min((e[2] for e in events), default=0.0)
    return {
        "ranks": len(results),
        "stages": {r["rank"]: r["stages"] for r in results},
        "weights": {r["rank"]: r["weights"] for r in results},
        "steps": by_step,
        "timeline": [(r, a, s - t0, e - t0) for r, a, s, e in events],
    }


def _check(
    results: list[dict[str, Any]],
    eager: BuiltModel,
    options: PipelineOptions,
    optimizer: str,
    lr: float,
    steps: int,
    inputs: tuple[Any, ...] | dict[str, Any],
    target: Any,
    tolerance: float,
) -> dict[str, Any]:
    """Train the factory's own model here the plain way; see [Note: an independent check]."""
    loss_fn = eager.loss_fn
    assert loss_fn is not None
    reference = run_reference(
        eager.model,
        loss_fn,
        inputs,
        target,
        microbatches=results[0]["microbatches"],
        loss_reduction=options.loss_reduction,
        optimizer_factory=OptimizerFactory(optimizer, lr),
        steps=steps,
        max_grad_norm=options.max_grad_norm,
        batchnorm=options.batchnorm,
    )
    return compare(results, reference, tolerance=tolerance)
