"""What a plan predicts about a step: the simulator run on its stages (`simulate_plan`,
`predict_step`), and the same split priced on other devices (`reprice`).

[Note: a step's fixed costs]
A calibrated device (``pipepart calibrate``) prices what a latency-bound step spends beyond its
compute, at the level where it is paid:

* per operation and per action (``dispatch_forward``, ``dispatch_backward``,
  ``action_overhead``): in the stage's compute time, F and B;
* per message (``message_overhead``): each message a stage sends or receives (one per cut, each
  way, per micro-batch: see [Note: one message per cut] in `pipeline.runtime.comm`) costs its
  rank that much, added to the F or B that sends or receives it; the link adds ``latency`` and
  the bytes over ``bandwidth`` between the ranks, overlapping compute;
* per step (``step_overhead``, ``update_rate``): after the schedule, every rank clears, checks
  and steps (`pipeline.runtime.update`), all ranks meeting in the non-finite check's all-reduce,
  so the step adds the fixed cost and the slowest rank's optimizer update, its parameter bytes
  over ``update_rate`` (`step_costs`).

The simulator's `SimResult.step_time` is the schedule alone; `predict_step` (a plan's
``step_time``) adds `step_costs`. Uncalibrated devices have every term 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from partition.devices import Device
from partition.errors import PlanError
from partition.plan import Plan, StagePlan
from partition.schedules.actions import Schedule
from partition.schedules.custom import schedule_for
from partition.schedules.names import canonical_schedule, stages_per_rank
from partition.schedules.simulate import SimResult, simulate
from partition.stage_plan import stage_graph

__all__ = ["predict_step", "reprice", "simulate_plan", "step_costs"]


def simulate_plan(
    plan: Plan, *, schedule: str | None = None, microbatches: int | None = None
) -> SimResult:
    """The simulator run on ``plan``'s stages (its schedule and micro-batches unless overridden).

    Stage times are the plan's per-micro-batch predictions: forward FLOPs over device speed plus
    the forward's fixed costs for F, the rest of the stage's compute time for B (split in half for
    zero-bubble I and W), and latency + bytes / bandwidth for each cut, sends overlapping compute.
    The forward's fixed costs are ``dispatch_forward`` per operation and half the action
    overhead: calibration measures the overhead of a forward and its backward together, and a
    1F1B or GPipe step depends on F + B alone once the pipeline is full. Each message a stage
    sends or receives adds ``message_overhead`` to its F or B; see [Note: a step's fixed costs].
    """
    built = _build(
        schedule or plan.schedule, plan.virtual, microbatches or plan.microbatches, plan.stages
    )
    return _simulate(built, plan.stages)


def predict_step(
    schedule: str, virtual: int, microbatches: int, stages: Sequence[StagePlan]
) -> tuple[float, float]:
    """Predicted step time and bubble of ``schedule`` with the stages' predicted times: the
    simulated schedule plus `step_costs`; the bubble is the schedule's."""
    built = _build(schedule, virtual, microbatches, stages)
    result = _simulate(built, stages)
    return float(result.step_time) + step_costs(stages, built), float(result.bubble_fraction)


def step_costs(stages: Sequence[StagePlan], schedule: Schedule) -> float:
    """Seconds a step adds to its schedule on ``stages`` (placed as ``schedule`` places them):
    the largest ``step_overhead`` and the slowest rank's optimizer update, its stages'
    parameter bytes over its device's ``update_rate``; see [Note: a step's fixed costs]."""
    update = [0.0] * schedule.num_ranks
    for s, stage in enumerate(stages):
        if stage.device.update_rate:
            update[schedule.stage_to_rank(s)] += stage.param_bytes / stage.device.update_rate
    return max(s.device.step_overhead for s in stages) + max(update)


def _build(schedule: str, virtual: int, microbatches: int, stages: Sequence[StagePlan]) -> Schedule:
    schedule = canonical_schedule(schedule)
    try:
        if stages_per_rank(schedule, virtual) != virtual:  # a V schedule on 1 per device
            raise PlanError(f"schedule {schedule!r} runs 2 per device")
    except PlanError as e:
        raise PlanError(
            f"the plan has {virtual} stage(s) per device, which schedule {schedule!r} cannot run "
            f"({e}); re-plan with --schedule interleaved --virtual V (V >= 2) for an "
            "interleaved pipeline, or --schedule zb-v or dualpipev for a V-shaped one"
        ) from e
    return schedule_for(schedule, len(stages) // virtual, microbatches, virtual)


def _simulate(built: Schedule, stages: Sequence[StagePlan]) -> SimResult:
    fwd = [
        s.forward_flops / s.device.flops
        + (s.dispatched * s.device.dispatch_forward + 0.5 * s.device.action_overhead)
        for s in stages
    ]
    bwd = [max(s.compute_time - f, 0.0) for s, f in zip(stages, fwd, strict=True)]
    weight = [b / 2 for b in bwd]  # a zero-bubble W sends nothing: no message costs
    # Per cut, whether a message crosses it: bytes, between two ranks (a V's turn is local).
    remote = [
        bool(s.send_bytes) and built.stage_to_rank(i) != built.stage_to_rank(i + 1)
        for i, s in enumerate(stages[:-1])
    ]
    for i in range(len(stages)):
        messages = int(i > 0 and remote[i - 1])  # receive F's input, send B's gradient
        messages += int(i < len(remote) and remote[i])  # send F's output, receive B's
        fwd[i] += messages * stages[i].device.message_overhead
        bwd[i] += messages * stages[i].device.message_overhead
    comm = [
        s.device.latency + s.send_bytes / s.device.bandwidth if s.send_bytes else 0.0
        for s in stages[:-1]
    ]
    activations = [s.saved_bytes for s in stages]
    return simulate(
        built,
        forward_time=fwd,
        backward_time=bwd,
        weight_time=weight,
        comm_time=comm,
        activation_bytes=activations,
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
