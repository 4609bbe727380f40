"""``pipepart plan``, ``show`` and ``simulate``: a plan made, re-read or played through the simulator."""

from __future__ import annotations

import argparse
import json
from typing import Any

from partition.idle import devices_note
from partition.memory import REDUCTIONS, replicated_memory
from partition.plan import Plan
from partition.planning.bubble import bubble_note
from partition.planning.replicas import predict_reduction
from partition.schedules.names import schedule_label
from partition.schedules.simulate import SimResult
from partition.units import format_size, format_time
from pipeline.cli.auto import add_auto_arguments, auto_table, make_auto_plan, wants_auto
from pipeline.cli.flags import (
    add_algorithm_argument,
    add_command,
    add_cuts_argument,
    add_model_arguments,
    add_plan_arguments,
    console,
    devices,
    devices_of_spec,
    make_plan,
    plan_options,
    progress,
)

__all__ = [
    "modes_line",
    "plan_summary",
    "plan_table",
    "register",
    "replicas_memory",
    "replicas_table",
]

_EPILOG_PLAN = """examples:
  pipepart plan gpt --size small --devices 4
  pipepart plan gpt --size 7b --batch 8 --seq 4096 --devices 8 --device-spec h100 --microbatches 16
  pipepart plan gpt --size 1b --device-spec "h100;h100;a100-40;a100-40" --out plan.json
  pipepart plan mypkg.models:build --devices 2 --device-spec "mem=16GiB,tflops=100,bw=25GB/s" --json
  pipepart plan gpt --size 1b --devices 4 --device-spec a100-40 --dp 8    # memory per device, DDP vs FSDP
  pipepart plan gpt --size 1b --device-spec h100 --auto --max-devices 8 --global-batch 32
"""

_EPILOG_SIMULATE = """examples:
  pipepart simulate plan.json --png gantt.png
  pipepart simulate plan.json --schedule gpipe --microbatches 32 --json
  pipepart simulate gpt --size 7b --seq 4096 --batch 32 --device-spec h100 --devices 8 --schedule interleaved --virtual 2 --microbatches 16
"""

_EPILOG_SHOW = """examples:
  pipepart show plan.json
  pipepart show plan.json --device-spec a100-40 --json
"""


def plan_table(plan: Plan, title: str | None = None) -> Any:
    """A rich table of a plan: one row per stage, the prediction underneath."""
    from rich.table import Table

    bottleneck = plan.bottleneck or 1.0
    table = Table(
        title=title
        or f"{plan.model.class_name} · {schedule_label(plan.schedule)} · {plan.microbatches} micro-batches · {plan.algorithm}"
        + (" · step objective" if plan.objective == "step" else "")
    )
    for column, justify in [
        ("stage", "right"),
        ("device", "left"),
        ("nodes (modules)", "left"),
        ("GFLOPs", "right"),
        ("params", "right"),
        ("memory / capacity", "right"),
        ("time", "right"),
        ("of bottleneck", "right"),
    ]:
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    element = plan.model.param_bytes / plan.model.num_parameters if plan.model.num_parameters else 4
    for stage in plan.stages:
        fits = stage.memory["total"] <= stage.capacity
        memory = f"{format_size(stage.memory['total'])} / {format_size(stage.capacity)}"
        table.add_row(
            str(stage.index),
            stage.device.name,
            f"{stage.start}–{stage.stop - 1} ({stage.first_module or stage.first_node} → {stage.last_module or stage.last_node})",
            f"{stage.flops / 1e9:,.2f}",
            f"{stage.param_bytes / element / 1e6:,.2f} M",
            memory if fits else f"[red]{memory} ✗[/red]",
            format_time(stage.time),
            f"{stage.time / bottleneck:.0%}",
        )
    ratio = plan.bottleneck / plan.perfect_balance if plan.perfect_balance else float("nan")
    table.caption = (
        f"predicted step {format_time(plan.step_time)} · bubble {plan.bubble:.1%} · "
        f"bottleneck stage {plan.bottleneck_stage} at {format_time(plan.bottleneck)}/micro-batch "
        f"({ratio:.3f}× perfect balance)"
        + ("" if plan.fits() else " · [red]does not fit memory[/red]")
        + (f"\n{modes_line(plan)}" if plan.model.modes else "")
        + (f"\n[yellow]{note}[/yellow]" if (note := devices_note(plan)) else "")
        + (f"\n[yellow]{poor}[/yellow]" if (poor := bubble_note(plan)) else "")
    )
    return table


def replicas_memory(plan: Plan, dp: int) -> dict[str, Any]:
    """Per device, a stage's memory with ``dp`` replicas under each reduction (``--json``);
    see [Note: memory with replicas] in `partition.memory`."""
    per: dict[str, Any] = {
        "dp": dp,
        "ranks": _replica_ranks(plan, dp),
        "capacity": [s.capacity for s in plan.stages],
    }
    for reduction in REDUCTIONS:
        per[reduction] = [
            replicated_memory(s.memory, s.param_bytes, dp, reduction) for s in plan.stages
        ]
    reduce = predict_reduction(plan, dp)  # see partition.planning.replicas
    per["reduce"] = {**reduce.to_dict(), "step_time": plan.step_time + reduce.exposed}
    return per


def _replica_ranks(plan: Plan, dp: int) -> list[list[int]]:
    """Per stage, the global rank holding it in each replica, as pipepart builds the mesh:
    replica ``r``'s pipeline rank ``p`` is global rank ``r * ranks + p`` (see [Note: the (dp, pp)
    mesh] in `pipeline.parallel.mesh`)."""
    ranks = plan.num_ranks
    return [[r * ranks + plan.stage_rank(s.index) for r in range(dp)] for s in plan.stages]


def replicas_table(plan: Plan, dp: int) -> Any:
    """``plan --dp``: each stage's memory per device with ``dp`` replicas, DDP beside FSDP."""
    from rich.table import Table

    table = Table(
        title=f"memory per device with {dp} replicas of the pipeline ({plan.num_ranks * dp} devices)"
    )
    for column in ("stage", "ranks", "device", "one pipeline", *REDUCTIONS, "capacity", "reduce"):
        table.add_column(column, justify="right")
    per = replicas_memory(plan, dp)
    reduce = per["reduce"]
    for k, stage in enumerate(plan.stages):
        cells = [format_size(per[r][k]) for r in REDUCTIONS]
        table.add_row(
            str(stage.index),
            ", ".join(map(str, per["ranks"][k])),
            stage.device.name,
            format_size(stage.memory["total"]),
            *(
                c if per[r][k] <= stage.capacity else f"[red]{c} ✗[/red]"
                for c, r in zip(cells, REDUCTIONS, strict=True)
            ),
            format_size(stage.capacity),
            format_time(reduce["stage_time"][k]),
        )
    table.caption = (
        f"predicted step {format_time(reduce['step_time'])}: the gradient all-reduce adds "
        f"{format_time(reduce['exposed'])} not hidden by the backward (reduce: a stage's "
        "gradients, ring all-reduce in 25 MB buckets over its link; see [Note: predicting the "
        "reduction over replicas] in partition.planning.replicas). ranks: the global rank of "
        "the stage in each replica; see [Note: memory with replicas] in partition.memory"
    )
    return table


def modes_line(plan: Plan) -> str:
    """Which of the model's modes ``plan`` traced and planned (see `ModelInfo.modes`)."""
    from partition.modes.modal import describe_modes

    return describe_modes(plan.model.modes)


def plan_summary(plan: Plan) -> dict[str, Any]:
    """``--json`` of ``plan`` and ``show``: the plan file's fields and the headline numbers."""
    return {**plan.to_dict(), **plan.summary(), "bubble_note": bubble_note(plan)}


def _cmd_plan(args: argparse.Namespace) -> int:
    options = plan_options(args)
    with progress(not args.json) as report:
        if wants_auto(args):  # --auto, --schedule auto: pipeline.cli.auto
            plan = make_auto_plan(args, options, report)
        else:
            plan = make_plan(args, options, devices(args), report)
    if args.out:
        plan.save(args.out)
    if args.json:
        summary = plan_summary(plan)
        if args.dp > 1:
            summary["replicas"] = replicas_memory(plan, args.dp)
        print(json.dumps(summary))
    else:
        out = console()
        out.print(plan_table(plan))
        if plan.auto is not None:
            out.print(auto_table(plan))
        if args.dp > 1:
            out.print(replicas_table(plan, args.dp))
        if args.out:
            out.print(f"plan written to {args.out}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    plan = _saved_plan(args.plan, args.device_spec)
    if args.json:
        print(json.dumps(plan_summary(plan)))
    else:
        console().print(plan_table(plan))
        if plan.auto is not None:
            console().print(auto_table(plan))
    return 0


def _saved_plan(path: str, device_spec: str | None) -> Plan:
    """The plan file at ``path``, priced on ``device_spec``'s devices if given (the same split:
    capacities and times change, nodes do not)."""
    from partition import reprice

    plan = Plan.load(path)
    if not device_spec:
        return plan
    return reprice(plan, devices_of_spec(device_spec, None, repeat=plan.num_ranks))


def _cmd_simulate(args: argparse.Namespace) -> int:
    from partition import simulate_plan

    if args.model.endswith(".json"):
        plan = _saved_plan(args.model, args.device_spec)
    else:  # plan it now, on the flags (the ones not given take plan's defaults)
        with progress(not args.json) as report:
            plan = make_plan(args, plan_options(args), devices(args), report)
    schedule = args.schedule or plan.schedule
    microbatches = args.microbatches or plan.microbatches
    result = simulate_plan(plan, schedule=schedule, microbatches=microbatches)
    if args.png:
        from partition.schedules.gantt import plot_gantt

        plot_gantt(
            result.timeline,
            num_ranks=plan.num_ranks,
            title=f"{plan.model.class_name} · {schedule_label(schedule)} · {microbatches} micro-batches · step {format_time(result.step_time)}",
            path=args.png,
        )
    if args.json:
        print(json.dumps(_simulation_summary(plan, result, schedule, microbatches, args.png)))
    else:
        title = f"{plan.model.class_name} · {schedule_label(schedule)} · {microbatches} micro-batches (simulated)"
        console().print(_simulation_table(plan, result, args.png, title))
    return 0


def _simulation_summary(
    plan: Plan, result: SimResult, schedule: str, microbatches: int, png: str | None
) -> dict[str, Any]:
    """``--json`` of ``simulate``: the schedule played, the step, each rank's peaks."""
    return {
        "schedule": schedule,
        "microbatches": microbatches,
        "ranks": plan.num_ranks,
        "step_time": result.step_time,
        "bubble": result.bubble_fraction,
        "busy_time": list(result.busy_time),
        "peak_activation_microbatches": list(result.peak_activation_microbatches),
        "peak_activation_bytes": list(result.peak_activation_bytes or ()),
        "bottleneck": plan.bottleneck,
        "png": png,
    }


def _simulation_table(plan: Plan, result: SimResult, png: str | None, title: str) -> Any:
    """A rich table of a simulated step: one row per rank, its stages and their peaks."""
    from rich.table import Table

    table = Table(title=title)
    for column in (
        "rank",
        "busy",
        "idle",
        "stages",
        "peak activations (micro-batches)",
        "peak activation memory",
    ):
        table.add_column(column, justify="right")
    stages_of: dict[int, list[int]] = {}
    for stage in plan.stages:
        stages_of.setdefault(plan.stage_rank(stage.index), []).append(stage.index)
    peak_bytes = result.peak_activation_bytes or [0] * plan.num_stages
    for rank, busy in enumerate(result.busy_time):
        mine = stages_of.get(rank, [])
        table.add_row(
            str(rank),
            format_time(busy),
            f"{1 - busy / result.step_time:.1%}" if result.step_time else "–",
            ", ".join(map(str, mine)),
            ", ".join(str(result.peak_activation_microbatches[s]) for s in mine),
            ", ".join(format_size(peak_bytes[s]) for s in mine),
        )
    table.caption = (
        f"step {format_time(result.step_time)} · bubble {result.bubble_fraction:.1%}"
        + (f" · Gantt chart written to {png}" if png else "")
    )
    return table


def register(sub: Any) -> None:
    """Add ``plan``, ``show`` and ``simulate`` to the sub-command parsers ``sub``."""
    plan = add_command(
        sub,
        "plan",
        _cmd_plan,
        help="plan a model over devices and print the stages",
        epilog=_EPILOG_PLAN,
    )
    add_model_arguments(plan)
    add_plan_arguments(plan)
    add_algorithm_argument(plan)
    add_cuts_argument(plan)
    add_auto_arguments(plan)
    plan.add_argument("--out", default=None, help="write the plan as JSON to this file")
    plan.add_argument(
        "--dp",
        type=int,
        default=1,
        help="data-parallel replicas of the pipeline: also print each stage's memory per device "
        "under DDP and FSDP (default 1: one pipeline)",
    )

    show = add_command(
        sub,
        "show",
        _cmd_show,
        help="re-print a saved plan, optionally priced on other devices",
        epilog=_EPILOG_SHOW,
    )
    show.add_argument("plan", help="a plan JSON file written by `pipepart plan --out`")
    show.add_argument("--device-spec", default=None, help="price the same split on these devices")

    simulate = add_command(
        sub,
        "simulate",
        _cmd_simulate,
        help="predict step time, bubble and memory of a plan's schedule; draw its Gantt chart",
        epilog=_EPILOG_SIMULATE,
    )
    add_model_arguments(simulate)
    add_plan_arguments(simulate, defaults=False)
    simulate.add_argument("--png", default=None, help="write the Gantt chart to this PNG")
