"""What a plan predicts about a step: the simulator run on its stages (`simulate_plan`,
`predict_step`), and the same split priced on other devices (`reprice`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from partition.devices import Device
from partition.errors import PlanError
from partition.plan import Plan, StagePlan
from partition.schedules.custom import schedule_for
from partition.schedules.names import canonical_schedule, is_custom
from partition.schedules.simulate import SimResult, simulate
from partition.stage_plan import stage_graph

__all__ = ["predict_step", "reprice", "simulate_plan"]


def simulate_plan(
    plan: Plan, *, schedule: str | None = None, microbatches: int | None = None
) -> SimResult:
    """The simulator run on ``plan``'s stages (its schedule and micro-batches unless overridden).

    Stage times are the plan's per-micro-batch predictions: forward FLOPs over device speed plus
    the forward's fixed costs for F, the rest of the stage's compute time for B (split in half for
    zero-bubble I and W), and latency + bytes / bandwidth for each cut, sends overlapping compute.
    The forward's fixed costs are ``dispatch_forward`` per operation and half the action
    overhead: calibration measures the overhead of a forward and its backward together, and a
    1F1B or GPipe step depends on F + B alone once the pipeline is full.
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
    if not is_custom(schedule) and (schedule == "interleaved") != (virtual > 1):
        raise PlanError(
            f"the plan has {virtual} stage(s) per device, which schedule {schedule!r} cannot run; "
            "re-plan with --schedule interleaved --virtual V (V >= 2) for an interleaved pipeline"
        )
    num_ranks = len(stages) // virtual
    built = schedule_for(schedule, num_ranks, microbatches, virtual)
    fwd = [
        s.forward_flops / s.device.flops
        + (s.dispatched * s.device.dispatch_forward + 0.5 * s.device.action_overhead)
        for s in stages
    ]
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
    from partition.algorithms.objective import evaluate
    from partition.algorithms.problem import Problem

    if len(devices) != plan.num_ranks:
        raise PlanError(
            f"the plan has {plan.num_ranks} ranks but {len(devices)} devices were given"
        )
    stages = plan.stages
    element = (
        plan.model.param_bytes / plan.model.num_parameters if plan.model.num_parameters else 4.0
    )
    graph = stage_graph(stages, element)
    problem = Problem(
        graph=graph,
        devices=tuple(devices),
        schedule=plan.schedule,
        microbatches=plan.microbatches,
        virtual=plan.virtual,
        memory=plan.memory_model,
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
