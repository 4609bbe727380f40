"""``pipepart run``: train a model on local ranks (or in torchrun's group) and show how it went."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from partition.devices import format_time, parse_devices
from partition.errors import PipepartError
from partition.memory import MemoryModel
from partition.microbatch import DEFAULT_MICROBATCHES
from partition.plan import Plan
from partition.schedules.names import SCHEDULE_NAMES
from pipeline.cli.common import (
    add_cuts_argument,
    add_model_arguments,
    console,
    make_plan,
    plan_options,
    progress,
)
from pipeline.launch.reference import DEFAULT_TOLERANCE
from pipeline.runtime.optim import OPTIMIZER_CLASSES

__all__ = ["register"]

_EPILOG_RUN = """The model trains on its own weights: the factory's model is built once (torch.manual_seed(--seed),
then the factory), and each rank reads only its stage's tensors; --weights init uses the model's
per-module init rules instead, for a model too big for host memory. A factory giving no loss is
trained on the output's own `loss` if it has one, else on the mean square of its outputs; a
loss_fn(output) of the output alone needs no target.

--check trains the factory's own model in this process the plain way, over the same
micro-batches, and fails (exit code 1) when a loss, gradient, parameter or buffer differs by more
than --check-tol (relative) or is not finite.

examples:
  pipepart run gpt --ranks 2 --steps 3 --check
  pipepart run gpt --ranks 4 --schedule interleaved --virtual 2 --microbatches 8 --json
  pipepart run gpt --ranks 2 --plan plan.json --steps 10 --png run.png
  pipepart run gpt --ranks 2 --steps 100 --checkpoint-dir ckpt --checkpoint-every 10 --restarts 2
  pipepart run gpt --ranks 4 --steps 200 --checkpoint-dir ckpt --checkpoint-every 10 --resume
  torchrun --nproc-per-node 4 -m pipeline.cli.main run gpt --ranks 4 --steps 100   # joins torchrun's group
"""


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
    return make_plan(args, options, parse_devices("cpu", args.ranks))


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline.launch.run import RunOptions, run_pipeline
    from pipeline.runtime.pipeline import PipelineOptions

    plan = args.plan
    schedule, microbatches = args.schedule, args.microbatches
    if plan is None:  # the defaults when the partitioner plans here
        schedule, microbatches = schedule or "1f1b", microbatches or DEFAULT_MICROBATCHES
    if args.cuts == "markers":
        plan = _marker_plan(args, schedule, microbatches)
        schedule = microbatches = None  # the plan's
    options = RunOptions(
        ranks=args.ranks,
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
            seed=args.seed,
            loss_reduction=args.loss,
            max_grad_norm=args.clip,
            recompute=args.recompute,
            batchnorm=args.batchnorm,
            weights=args.weights,
            checkpoint=args.checkpoint,
        ),
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        keep=args.keep,
        resume=args.resume,
        restarts=args.restarts,
    )
    with progress(not args.json) as report:
        report(f"training {args.model} on {args.ranks} ranks")
        result = run_pipeline(args.model, options, plan=plan)
    if not result:  # a torchrun rank other than 0: rank 0 reports
        return 0
    if args.png:
        from partition.schedules.actions import Action
        from partition.schedules.gantt import plot_gantt

        events = [
            (r, a if isinstance(a, Action) else Action.parse(str(a)), s, e)
            for r, a, s, e in result["timeline"]
        ]
        plot_gantt(
            events,
            num_ranks=result["ranks"],
            title=f"{args.model} · measured last step",
            path=args.png,
        )
    if args.json:
        summary = {k: v for k, v in result.items() if k != "timeline"}
        summary["timeline"] = [[r, str(a), s, e] for r, a, s, e in result["timeline"]]
        print(json.dumps(_finite(summary), default=str))
        return _check_status(result)
    from rich.table import Table

    table = Table(title=f"{args.model} on {result['ranks']} ranks")
    table.add_column("step", justify="right")
    table.add_column("time", justify="right")
    table.add_column("loss", justify="right")
    for row in result["steps"]:
        table.add_row(
            str(row["step"]),
            format_time(row["time"]),
            f"{row['loss']:.6f}" if row["loss"] is not None else "–",
        )
    out = console()
    out.print(table)
    sources = sorted({s for ranks in result.get("weights", {}).values() for s in ranks})
    if sources:
        out.print(f"weights from: {', '.join(sources)} (see --weights)")
    check = result.get("check")
    if check:
        shown = ", ".join(
            f"{k} {_fmt_diff(check[k])}" for k in ("loss", "grads", "params", "buffers")
        )
        verdict = (
            "[green]passed[/green]"
            if check["passed"]
            else f"[red]FAILED[/red]: {'; '.join(check['failures'])}"
        )
        out.print(
            f"largest relative difference from the factory's model trained on one process: "
            f"{shown} (tolerance {check['tolerance']:g}) — {verdict}"
        )
    return _check_status(result)


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float as the string ``"nan"``, ``"inf"`` or ``"-inf"``
    (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return _fmt_diff(value) if not value < 0 else "-inf"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _fmt_diff(d: float) -> str:
    return "nan" if math.isnan(d) else ("inf" if math.isinf(d) else f"{d:.3g}")


def _check_status(result: dict[str, Any]) -> int:
    """1 when --check ran and failed; see [Note: an independent check] in `pipeline.launch.reference`."""
    check = result.get("check")
    return 1 if check is not None and not check["passed"] else 0


def register(sub: Any) -> None:
    """Add ``run`` to the sub-command parsers ``sub``."""
    run = sub.add_parser(
        "run",
        help="train a model on local ranks (or under torchrun) with a pipeline schedule",
        epilog=_EPILOG_RUN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(run)
    run.add_argument("--ranks", type=int, default=2, help="processes to spawn (default 2)")
    run.add_argument(
        "--plan", default=None, help="a plan JSON file (default: plan now with --schedule)"
    )
    add_cuts_argument(run)
    run.add_argument(
        "--schedule",
        default=None,
        choices=SCHEDULE_NAMES,
        help="schedule when no plan is given (default 1f1b)",
    )
    run.add_argument(
        "--microbatches",
        type=int,
        default=None,
        help=f"micro-batches per step (default: the plan's, else {DEFAULT_MICROBATCHES})",
    )
    run.add_argument(
        "--virtual", type=int, default=None, help="stages per rank for the interleaved schedule"
    )
    run.add_argument("--steps", type=int, default=3, help="optimizer steps (default 3)")
    run.add_argument(
        "--check",
        action="store_true",
        help="also train the factory's model in one process the plain way and compare: the "
        "largest relative loss / gradient / parameter / buffer differences; exit 1 past --check-tol",
    )
    run.add_argument(
        "--check-tol",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"largest relative difference --check accepts (default {DEFAULT_TOLERANCE:g}, for fp32)",
    )
    run.add_argument(
        "--weights",
        default="auto",
        choices=("auto", "factory", "init"),
        help="where the weights come from: the factory's model built once (factory), the model's "
        "init rules on each rank's tensors only (init), or factory when it fits in host memory "
        "(auto, the default)",
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
        default=0,
        help="when a rank dies, start every rank again up to N times, resuming from the newest "
        "complete checkpoint (local ranks; under torchrun use its --max-restarts)",
    )
    run.add_argument(
        "--seed",
        type=int,
        default=0,
        help="torch.manual_seed before the factory, and the data seed",
    )
    run.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    run.add_argument(
        "--optimizer",
        default="sgd",
        choices=tuple(OPTIMIZER_CLASSES),
        help="optimizer (default sgd)",
    )
    run.add_argument(
        "--loss",
        default="mean",
        choices=("mean", "sum"),
        help="how micro-batch losses combine (default mean)",
    )
    run.add_argument("--clip", type=float, default=None, help="clip gradients to this global norm")
    run.add_argument(
        "--recompute", action="store_true", help="recompute activations in the backward"
    )
    run.add_argument(
        "--batchnorm",
        default="microbatch",
        choices=("microbatch", "batch"),
        help="BatchNorm running statistics in train mode: updated per micro-batch (default, as "
        "one process running the micro-batches in turn), or once per step from the whole batch",
    )
    run.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds a rank waits for a peer before failing (default 300)",
    )
    run.add_argument(
        "--png", default=None, help="draw the last step's measured Gantt chart to this PNG"
    )
    run.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: per-step times and losses, --check differences",
    )
    run.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    run.set_defaults(func=_cmd_run)
