"""Planning with the schedules at hand: `plan_model`, and the simulator's view of a plan.

`partition` traces, costs and splits; what a plan predicts about a step — its time, its bubble,
and how many micro-batches each stage holds — comes from running the schedule's own actions,
which live here in `pipeline` (see [Note: in-flight counts come from the schedule] in
`partition.memory`). So the planner a user calls is this module's: it hands the partitioner the
schedule's in-flight counts (`schedule_inflight`) and the simulator's step prediction
(`predict_step`), and `reprice` / `simulate_plan` work from a plan file alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from partition.devices import Device
from partition.errors import PlanError
from partition.graph import LinearGraph
from partition.memory import canonical_schedule, closed_form_inflight
from partition.options import PlanOptions
from partition.plan import Plan, StagePlan
from partition.planner import Analysis, analyze, build_plan
from pipeline.schedules import build_schedule, peak_inflight
from pipeline.simulate import SimResult, simulate

__all__ = [
    "plan_analysis",
    "plan_model",
    "predict_step",
    "reprice",
    "schedule_inflight",
    "simulate_plan",
]

Progress = Callable[[str], None]


@functools.lru_cache(maxsize=256)
def schedule_inflight(
    schedule: str, ranks: int, microbatches: int, virtual: int = 1
) -> tuple[int, ...]:
    """The peak micro-batches each stage holds under ``schedule``: `peak_inflight` of its actions.

    A count the schedule cannot run (interleaved needs the micro-batches to be a multiple of the
    ranks) gets the closed-form bound, so that the search for the fewest devices that fit can
    still price it; planning for that count fails later, naming the rule.
    """
    try:
        built = build_schedule(schedule, ranks, microbatches, virtual)
    except PlanError:
        return closed_form_inflight(schedule, ranks, microbatches, virtual)
    return tuple(peak_inflight(built))


def plan_model(
    model: nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor,
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    devices: Sequence[Device],
    options: PlanOptions | None = None,
    progress: Progress | None = None,
    **knobs: Any,
) -> Plan:
    """Plan ``model`` over ``devices``: the one call most users need.

    Args:
        model: the model, on any device (``meta`` for models larger than memory).
        example_inputs: one full batch (see [Note: micro-batch shapes] in `partition.planner`).
        devices: one per pipeline rank, in pipeline order.
        options: see `PlanOptions` (schedule, micro-batches, memory model, algorithm, cuts...).
        progress: called with a line of text as each phase starts.
        knobs: `PlanOptions` fields given one by one (``microbatches=8``), over ``options``.

    Raises:
        InputError, TraceError: the inputs or the model cannot be traced.
        InfeasibleError: no split fits; the message says what would.
    """
    options = _options(options, knobs)
    if not devices:
        raise PlanError("no devices given")
    analysis = analyze(
        model,
        example_inputs,
        example_kwargs,
        microbatches=options.microbatches,
        method=options.method,
        leaf_modules=options.leaf_modules,
        concrete_args=options.concrete_args,
        order=options.node_order,
        profile_on=devices[0] if options.profile else None,
        profile_device="cuda" if options.profile and torch.cuda.is_available() else "cpu",
        progress=progress,
    )
    if progress:
        progress(f"partitioning {len(analysis.graph)} nodes over {len(devices)} devices")
    return plan_analysis(analysis, devices, options)


def plan_analysis(
    analysis: Analysis,
    devices: Sequence[Device],
    options: PlanOptions | None = None,
    **knobs: Any,
) -> Plan:
    """A plan of an already traced and costed model — cheap, so trying many splits is too.

    ``options`` (or ``knobs``, its fields one by one) default to the analysis' micro-batches and
    `PlanOptions`' other defaults; its tracing fields are not used (the model is traced already).
    """
    if options is None:
        options = PlanOptions(microbatches=analysis.microbatches)
    options = _options(options, knobs)
    solution = analysis.solve(devices, options, inflight=schedule_inflight)
    return build_plan(analysis, solution, predict=predict_step)


def _options(options: PlanOptions | None, knobs: Mapping[str, Any]) -> PlanOptions:
    """``options`` with ``knobs`` (`PlanOptions` fields) over it; an unknown knob is an error."""
    unknown = sorted(set(knobs) - {f.name for f in fields(PlanOptions)})
    if unknown:
        raise TypeError(
            f"unknown planning option(s) {', '.join(unknown)}; PlanOptions has "
            + ", ".join(f.name for f in fields(PlanOptions))
        )
    return replace(options or PlanOptions(), **knobs)


def simulate_plan(
    plan: Plan, *, schedule: str | None = None, microbatches: int | None = None
) -> SimResult:
    """The simulator run on ``plan``'s stages (its schedule and micro-batches unless overridden).

    Stage times are the plan's per-micro-batch predictions: forward FLOPs over device speed for F,
    the rest of the stage's compute for B (split in half for zero-bubble I and W), and latency +
    bytes / bandwidth for each cut, sends overlapping compute.
    """
    return _simulate(
        schedule or plan.schedule, plan.virtual, microbatches or plan.microbatches, plan.stages
    )


def predict_step(
    schedule: str, virtual: int, microbatches: int, stages: Sequence[StagePlan]
) -> tuple[float, float]:
    """Simulated step time and bubble of ``schedule`` with the stages' predicted times."""
    result = _simulate(schedule, virtual, microbatches, stages)
    return float(result.step_time), float(result.bubble_fraction)


def _simulate(
    schedule: str, virtual: int, microbatches: int, stages: Sequence[StagePlan]
) -> SimResult:
    schedule = canonical_schedule(schedule)
    if (schedule == "interleaved") != (virtual > 1):
        raise PlanError(
            f"the plan has {virtual} stage(s) per device, which schedule {schedule!r} cannot run; "
            "re-plan with --schedule interleaved --virtual V (V >= 2) for an interleaved pipeline"
        )
    num_ranks = len(stages) // virtual
    built = build_schedule(schedule, num_ranks, microbatches, virtual)
    fwd = [s.forward_flops / s.device.flops for s in stages]
    bwd = [max(s.compute_time - f, 0.0) for s, f in zip(stages, fwd, strict=True)]
    comm = [
        s.device.latency + s.send_bytes / s.device.bandwidth if s.send_bytes else 0.0
        for s in stages[:-1]
    ]
    activations = [s.saved_bytes for s in stages]
    return simulate(
        built, forward_time=fwd, backward_time=bwd, comm_time=comm, activation_bytes=activations
    )


def reprice(plan: Plan, devices: Sequence[Device]) -> Plan:
    """The same split priced on other ``devices`` (one per rank): times, capacities, prediction.

    Works from the plan file alone — each stage becomes one node of a stage-level graph, which
    the same objective (`partition.algorithms.objective.evaluate`) prices.
    """
    from partition.algorithms.objective import Problem, evaluate

    if len(devices) != plan.num_ranks:
        raise PlanError(
            f"the plan has {plan.num_ranks} ranks but {len(devices)} devices were given"
        )
    stages = plan.stages
    element = (
        plan.model.param_bytes / plan.model.num_parameters if plan.model.num_parameters else 4.0
    )
    graph = LinearGraph(
        names=tuple(f"stage{s.index}" for s in stages),
        module_paths=tuple(s.first_module for s in stages),
        compute=np.array([s.flops for s in stages], dtype=np.float64),
        forward=np.array([s.forward_flops for s in stages], dtype=np.float64),
        param_bytes=np.array([s.param_bytes for s in stages], dtype=np.float64),
        saved_bytes=np.array([s.saved_bytes for s in stages], dtype=np.float64),
        cut_bytes=np.array([0.0, *(s.send_bytes for s in stages[:-1]), 0.0]),
        param_element_size=element,
    )
    problem = Problem(
        graph=graph,
        devices=tuple(devices),
        schedule=plan.schedule,
        microbatches=plan.microbatches,
        virtual=plan.virtual,
        memory=plan.memory_model,
        inflight_fn=schedule_inflight,
    )
    evaluation = evaluate(problem, tuple(range(len(stages) + 1)))
    new_stages = tuple(
        replace(
            stage,
            device=problem.stage_device(s),
            capacity=int(evaluation.caps[s]),
            compute_time=evaluation.stage_compute_times[s],
            comm_time=evaluation.stage_comm_times[s],
            memory={**evaluation.stage_memory_parts[s], "total": evaluation.stage_memory[s]},
        )
        for s, stage in enumerate(stages)
    )
    step_time, bubble = predict_step(plan.schedule, plan.virtual, plan.microbatches, new_stages)
    return replace(
        plan,
        stages=new_stages,
        bottleneck=evaluation.bottleneck,
        perfect_balance=evaluation.perfect_balance,
        step_time=step_time,
        bubble=bubble,
    )
