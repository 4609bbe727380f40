"""``pipepart plan --auto`` and ``--schedule auto``: the configuration search's flags, its call,
and the table of the choice and its runner-ups that ``plan`` and ``show`` print.

The search is `partition.planning.model.plan_auto` ([Note: the configuration search] in
`partition.planning.auto`); this module only reads the flags into an `AutoOptions`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from partition.auto_choice import AUTO_OBJECTIVES
from partition.errors import PlanError
from partition.options import PlanOptions
from partition.plan import Plan
from partition.units import format_size, format_time
from pipeline.cli.flags import DEFAULT_DEVICE_SPEC, devices_of_spec, meta_model

__all__ = ["add_auto_arguments", "auto_table", "make_auto_plan", "wants_auto"]


def add_auto_arguments(parser: argparse.ArgumentParser) -> None:
    """``--auto``, ``--max-devices``, ``--global-batch`` and ``--auto-objective`` on ``plan``."""
    parser.add_argument(
        "--auto",
        action="store_true",
        help="search the schedule, micro-batch count, recompute and device count, and plan the "
        "best (with --devices N: on N devices; with --max-devices N: on 1 to N)",
    )
    parser.add_argument(
        "--max-devices",
        type=int,
        default=None,
        help="with --auto: try every device count up to this one",
    )
    parser.add_argument(
        "--global-batch",
        type=int,
        default=None,
        help="with --auto: samples per step, whose divisors are the micro-batch counts tried "
        "(default --batch)",
    )
    parser.add_argument(
        "--auto-objective",
        choices=AUTO_OBJECTIVES,
        default="step",
        help="with --auto: rank by predicted step time (default) or by throughput per device",
    )


def wants_auto(args: argparse.Namespace) -> bool:
    """Whether ``plan`` searches: ``--auto``, or ``--schedule auto`` (the schedule alone)."""
    if getattr(args, "schedule", None) == "auto":
        return True
    if not getattr(args, "auto", False):
        for flag in ("max_devices", "global_batch"):
            if getattr(args, flag, None) is not None:
                raise PlanError(f"--{flag.replace('_', '-')} needs --auto")
        return False
    return True


def make_auto_plan(
    args: argparse.Namespace, options: PlanOptions, report: Callable[[str], None] | None
) -> Plan:
    """The plan ``--auto`` (or ``--schedule auto``) chooses, with its runner-ups."""
    from partition.planning.auto import AutoOptions
    from partition.planning.model import plan_auto
    from partition.schedules.names import SCHEDULE_NAMES

    spec = args.device_spec or DEFAULT_DEVICE_SPEC
    if args.global_batch is not None:
        args.batch = args.global_batch  # the example inputs are one global batch
    if args.auto and args.devices is not None and args.max_devices is not None:
        raise PlanError("give --devices N (exactly N) or --max-devices N (1 to N), not both")
    most: int | None = None
    if args.max_devices is not None and args.auto:
        pool = devices_of_spec(spec, None, repeat=args.max_devices)
        most, exactly = args.max_devices, None
    else:
        pool = devices_of_spec(spec, args.devices, repeat=4)
        exactly = args.devices or len(pool)
    auto = AutoOptions(
        global_batch=args.batch, objective=args.auto_objective, devices=exactly, max_devices=most
    )
    if not args.auto:  # --schedule auto: the schedule alone, everything else as given
        auto = replace(
            auto,
            schedules=SCHEDULE_NAMES,
            microbatches=(options.microbatches,),
            recompute=(options.memory.recompute,),
        )
    if getattr(args, "objective", None) is None:  # the search prices each split by its step
        options = replace(options, objective="step")
    if report:
        report(f"building {args.model} on meta")
    model, inputs, kwargs = meta_model(args)
    return plan_auto(model, inputs, kwargs, pool=pool, auto=auto, options=options, progress=report)


def auto_table(plan: Plan) -> Any:
    """The configuration ``--auto`` chose and its runner-ups, best first (None without one)."""
    from rich.table import Table

    choice = plan.auto
    if choice is None:
        return None
    by = "predicted step" if choice.objective == "step" else "throughput per device"
    table = Table(
        title=f"--auto: {choice.searched} configurations priced, ranked by {by} "
        f"(global batch {choice.global_batch})"
    )
    for column in ("", "configuration", "step", "samples/s/device", "peak memory"):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    rows = [("chosen", choice.chosen), *((f"#{i + 2}", c) for i, c in enumerate(choice.runner_ups))]
    for label, c in rows:
        table.add_row(
            label,
            c.config.describe(),
            format_time(c.step_time),
            f"{c.throughput:,.3g}",
            format_size(c.peak_memory),
        )
    if choice.skipped:
        table.caption = "skipped: " + "; ".join(choice.skipped)
    return table
