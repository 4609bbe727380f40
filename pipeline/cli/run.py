"""``pipepart run``: train a model on local ranks (or in torchrun's group) and show how it went."""

from __future__ import annotations

import argparse
import json
from typing import Any

from partition.devices import parse_devices
from partition.errors import PipepartError
from partition.memory import MemoryModel
from partition.microbatch import DEFAULT_MICROBATCHES
from partition.plan import Plan
from partition.schedules.names import DEFAULT_SCHEDULE, SCHEDULE_NAMES
from pipeline.cli.flags import (
    add_command,
    add_cuts_argument,
    add_model_arguments,
    make_plan,
    plan_options,
    progress,
    schedule_argument,
)
from pipeline.cli.outcome import check_status, finite_json, print_run
from pipeline.launch.options import RunOptions
from pipeline.runtime.finite import ON_NONFINITE
from pipeline.runtime.optim import OPTIMIZER_CLASSES
from pipeline.runtime.options import PipelineOptions

__all__ = ["register", "run_options"]

_EPILOG_RUN = """The model trains on its own weights: the factory's model is built once (torch.manual_seed(--seed),
then the factory), and each rank reads only its stage's tensors; --weights init uses the model's
per-module init rules instead, for a model too big for host memory. A factory giving no loss is
trained on the output's own `loss` if it has one, else on the mean square of its outputs; a
loss_fn(output) of the output alone needs no target.

A step whose loss or gradients are not finite stops the run with an error naming the step and
the first stage and tensor (--on-nonfinite skip drops such a step's update on every rank, warn
trains on); a checkpoint whose weights are not finite is never saved.

--check trains the factory's own model in this process the plain way, over the same
micro-batches, and fails (exit code 1) when a loss, gradient, parameter or buffer differs by more
than --check-tol (relative) or is not finite.

--pp P --dp D trains D replicas of a P-rank pipeline (--ranks P*D): each replica reads its own
shard of the batch, and the gradients are averaged over the replicas once per optimizer step
(--dp-reduce fsdp shards weights, gradients and optimizer state over the replicas);
--accumulate K adds K steps' gradients before each optimizer step. The batch (--batch) is the
global one: K*D shards of --microbatches micro-batches each, and --check trains one process on
all of it.

examples:
  pipepart run gpt --ranks 2 --steps 3 --check
  pipepart run gpt --ranks 4 --pp 2 --dp 2 --accumulate 2 --batch 16 --check
  pipepart run gpt --ranks 4 --pp 2 --dp 2 --dp-reduce fsdp --check
  pipepart run gpt --ranks 4 --schedule interleaved --virtual 2 --microbatches 8 --json
  pipepart run gpt --ranks 2 --plan plan.json --steps 10 --png run.png
  pipepart run gpt --ranks 2 --steps 100 --checkpoint-dir ckpt --checkpoint-every 10 --restarts 2
  pipepart run gpt --ranks 4 --steps 200 --checkpoint-dir ckpt --checkpoint-every 10 --resume
  torchrun --nproc-per-node 4 -m pipeline.cli run gpt --ranks 4 --steps 100   # joins torchrun's group
"""

_RUN = RunOptions()
"""The defaults of ``run``'s flags (but ``--steps``, and the plan's): `run_pipeline`'s own."""


def _marker_plan(args: argparse.Namespace, schedule: str, microbatches: int) -> Plan:
    """`pipepart run --cuts markers`: a plan with the model's own cuts, one stage per rank."""
    if args.plan is not None:
        raise PipepartError("--cuts markers makes the plan itself; leave out --plan")
    options = plan_options(
        args,
        schedule=schedule,
        microbatches=microbatches,
        virtual=args.virtual or 1,
        memory=MemoryModel(),  # --optimizer is the run's; the markers fix the cuts anyway
        cuts="markers",
    )
    pp, dp = _pp_dp(args)
    return make_plan(args, options, parse_devices("cpu", pp or max(1, args.ranks // (dp or 1))))


def _pp_dp(args: argparse.Namespace) -> tuple[int | None, int | None]:
    """``(pp, dp)`` of ``--pp`` and ``--dp``, ``dp`` from ``--ranks / --pp`` when not given
    (`RunOptions` checks that ``ranks == pp * dp``, ``pp`` None meaning ``ranks / dp``)."""
    pp, dp = args.pp, args.dp
    if dp is None and pp and args.ranks % pp == 0 and args.ranks > pp:
        dp = args.ranks // pp
    return pp, dp


def run_options(args: argparse.Namespace) -> tuple[RunOptions, Plan | str | None]:
    """The `RunOptions` of ``pipepart run``'s flags, and the plan to run: ``--plan``'s file, the
    one ``--cuts markers`` makes here, or none: then the launcher plans, once, with the planning
    flags (``--trace``, ``--leaf``...) and the run's optimizer as the memory model."""
    plan: Plan | str | None = args.plan
    schedule, microbatches = args.schedule, args.microbatches
    planning = None
    if plan is None:  # the defaults when the partitioner plans here
        schedule, microbatches = schedule or DEFAULT_SCHEDULE, microbatches or DEFAULT_MICROBATCHES
        planning = plan_options(args, memory=MemoryModel(optimizer=args.optimizer))
    if args.cuts == "markers":
        plan = _marker_plan(args, schedule, microbatches)
        schedule = microbatches = planning = None  # the plan's
    pp, dp = _pp_dp(args)
    options = RunOptions(
        ranks=args.ranks,
        pp=pp,
        accumulate=args.accumulate,
        steps=args.steps,
        optimizer=args.optimizer,
        lr=args.lr,
        check=args.check,
        check_tol=args.check_tol,
        timeout=args.timeout,
        size=args.size,
        batch=args.batch,
        seq=args.seq,
        pipeline=PipelineOptions(
            schedule=schedule,
            microbatches=microbatches,
            virtual=args.virtual,
            planning=planning,
            seed=args.seed,
            loss_reduction=args.loss,
            max_grad_norm=args.clip,
            on_nonfinite=args.on_nonfinite,
            recompute=args.recompute,
            batchnorm=args.batchnorm,
            weights=args.weights,
            checkpoint=args.checkpoint,
            dp=dp,
            dp_reduce=args.dp_reduce,
        ),
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        keep=args.keep,
        resume=args.resume,
        restarts=args.restarts,
    )
    return options, plan


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline.launch.run import run_pipeline

    options, plan = run_options(args)
    with progress(not args.json) as report:
        report(f"training {args.model} on {args.ranks} ranks")
        result = run_pipeline(args.model, options, plan=plan)
    if result is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    if args.png:
        from partition.schedules.actions import Action
        from partition.schedules.gantt import plot_gantt

        events = [(r, Action.parse(a), s, e) for r, a, s, e in result.timeline]
        plot_gantt(
            events,
            num_ranks=result.ranks,
            title=f"{args.model} · measured last step",
            path=args.png,
        )
    if args.json:
        print(json.dumps(finite_json(result.to_json()), default=str))
        return check_status(result)
    print_run(args.model, result)
    return check_status(result)


def register(sub: Any) -> None:
    """Add ``run`` to the sub-command parsers ``sub``."""
    run = add_command(
        sub,
        "run",
        _cmd_run,
        help="train a model on local ranks (or under torchrun) with a pipeline schedule",
        epilog=_EPILOG_RUN,
        json_help="print one JSON object: per-step times and losses, --check differences",
    )
    add_model_arguments(run)
    run.add_argument(
        "--ranks", type=int, default=_RUN.ranks, help=f"processes to spawn (default {_RUN.ranks})"
    )
    _add_mesh_arguments(run)
    _add_schedule_arguments(run)
    run.add_argument("--steps", type=int, default=3, help="optimizer steps (default 3)")
    _add_check_arguments(run)
    _add_weights_arguments(run)
    _add_training_arguments(run)
    run.add_argument(
        "--timeout",
        type=float,
        default=_RUN.timeout,
        help=f"seconds a rank waits for a peer before failing (default {_RUN.timeout:g})",
    )
    run.add_argument(
        "--png", default=None, help="draw the last step's measured Gantt chart to this PNG"
    )


def _add_mesh_arguments(run: argparse.ArgumentParser) -> None:
    """Replicas of the pipeline, and steps accumulated before each optimizer step."""
    run.add_argument(
        "--pp",
        type=int,
        default=None,
        help="pipeline ranks per replica (default --ranks / --dp)",
    )
    run.add_argument(
        "--dp",
        type=int,
        default=None,
        help="data-parallel replicas of the pipeline, each on its own shard of the batch "
        "(default --ranks / --pp, else 1); --ranks must be --pp x --dp",
    )
    run.add_argument(
        "--dp-reduce",
        choices=("ddp", "fsdp"),
        default="ddp",
        help="how replicas share gradients: ddp (replicated weights, gradients all-reduced in "
        "buckets as each stage's backward ends; the default) or fsdp (FSDP2's fully_shard over "
        "the replicas: weights, gradients and optimizer state sharded, gradients "
        "reduce-scattered as each stage's backward ends)",
    )
    run.add_argument(
        "--accumulate",
        type=int,
        default=_RUN.accumulate,
        help="steps whose gradients add up before each optimizer step (default "
        f"{_RUN.accumulate}); the batch is split into --accumulate x --dp shards",
    )


def _add_schedule_arguments(run: argparse.ArgumentParser) -> None:
    """Where the split and the schedule come from: a plan file, the markers, or the flags."""
    run.add_argument(
        "--plan", default=None, help="a plan JSON file (default: plan now with --schedule)"
    )
    add_cuts_argument(run)
    run.add_argument(
        "--schedule",
        default=None,
        type=schedule_argument,
        metavar="{" + ",".join(SCHEDULE_NAMES) + ",@FILE}",
        help=f"schedule when no plan is given (default {DEFAULT_SCHEDULE}), or @FILE: one you "
        "write, a line of actions per rank (see the README)",
    )
    run.add_argument(
        "--microbatches",
        type=int,
        default=None,
        help=f"micro-batches per step (default: the plan's, else {DEFAULT_MICROBATCHES})",
    )
    run.add_argument(
        "--virtual",
        type=int,
        default=None,
        help="stages per rank for the interleaved schedule (zb-v, dualpipev: 2, set for you)",
    )


def _add_check_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument(
        "--check",
        action="store_true",
        help="also train the factory's model in one process the plain way and compare: the "
        "largest relative loss / gradient / parameter / buffer differences; exit 1 past --check-tol",
    )
    run.add_argument(
        "--check-tol",
        type=float,
        default=_RUN.check_tol,
        help=f"largest relative difference --check accepts (default {_RUN.check_tol:g}, for fp32)",
    )


def _add_weights_arguments(run: argparse.ArgumentParser) -> None:
    """Where the weights come from, and the checkpoints the ranks save and resume from."""
    run.add_argument(
        "--weights",
        default=_RUN.pipeline.weights,
        choices=("auto", "factory", "init"),
        help="where the weights come from: the factory's model built once (factory), the model's "
        "init rules on each rank's tensors only (init), or factory when it fits in host memory "
        f"({_RUN.pipeline.weights}, the default)",
    )
    run.add_argument(
        "--checkpoint",
        default=None,
        help="a whole-model state_dict (.pt) or .safetensors file; each rank reads only its tensors",
    )
    run.add_argument(
        "--checkpoint-dir",
        default=None,
        help="save pipeline checkpoints (step-N directories) here, and resume from them",
    )
    run.add_argument("--checkpoint-every", type=int, default=None, help="save after every N steps")
    run.add_argument(
        "--keep", type=int, default=None, help="keep only the newest K complete checkpoints"
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="start from the newest complete checkpoint in --checkpoint-dir (says why it "
        "skipped any newer one)",
    )
    run.add_argument(
        "--restarts",
        type=int,
        default=_RUN.restarts,
        help="when a rank dies, start every rank again up to N times, resuming from the newest "
        "complete checkpoint (local ranks; under torchrun use its --max-restarts)",
    )


def _add_training_arguments(run: argparse.ArgumentParser) -> None:
    """The seed, the optimizer, the loss and what each step does beyond the schedule."""
    run.add_argument(
        "--seed",
        type=int,
        default=_RUN.pipeline.seed,
        help="torch.manual_seed before the factory, and the data seed",
    )
    run.add_argument(
        "--lr", type=float, default=_RUN.lr, help=f"learning rate (default {_RUN.lr:g})"
    )
    run.add_argument(
        "--optimizer",
        default=_RUN.optimizer,
        choices=tuple(OPTIMIZER_CLASSES),
        help=f"optimizer (default {_RUN.optimizer})",
    )
    run.add_argument(
        "--loss",
        default=_RUN.pipeline.loss_reduction,
        choices=("mean", "sum"),
        help=f"how micro-batch losses combine (default {_RUN.pipeline.loss_reduction})",
    )
    run.add_argument("--clip", type=float, default=None, help="clip gradients to this global norm")
    run.add_argument(
        "--on-nonfinite",
        default=_RUN.pipeline.on_nonfinite,
        choices=ON_NONFINITE,
        help="a step whose loss or gradients are not finite: stop with an error naming the step "
        "(default), skip its update on every rank, or warn and train on; a checkpoint of "
        "non-finite weights is never saved",
    )
    run.add_argument(
        "--recompute", action="store_true", help="recompute activations in the backward"
    )
    run.add_argument(
        "--batchnorm",
        default=_RUN.pipeline.batchnorm,
        choices=("microbatch", "batch"),
        help="BatchNorm running statistics in train mode: updated per micro-batch (default, as "
        "one process running the micro-batches in turn), or once per step from the whole batch",
    )
