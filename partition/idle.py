"""Idle stages: which stages of a plan leave their device all but unused, and what fewer
devices would do with the same nodes.

[Note: idle stages]
A stage is *idle* when its compute is at most `IDLE_SHARE` (1 %) of an even share of the
model's (its FLOPs against ``sum / k``): an input and its shape queries, a ``size``, an
``arange``. Among the splits of the least bottleneck the partitioner takes the fewest idle
stages (the first tie-break of [Note: objective] in `partition.algorithms.objective`), so an
optimal plan with idle stages has them because no split of its bottleneck gives them work: on a
small model the links between devices cost more than the compute (the bundled toy GPT over 4
``cpu`` devices: every inner stage pays two links, 200 µs, for 32 µs of compute in all).

Then more devices cannot help, and the plan says so (`devices_note`, in ``pipepart plan``'s
table and ``--json``): it prices the same nodes on the devices that hold work, each idle stage
merged into the next working one (the last ones into the one before), with the same objective
the partitioner uses (`partition.algorithms.objective.evaluate`, on a graph of one node per
stage, as `partition.planning.predict.reprice` does), and reports whether that is as fast or
faster. A plan without idle stages is compared with the whole model on one of its devices: on
a small model two devices can already be slower than one. Fewer stages never take longer to
step when their bottleneck is no larger: a step is about ``(m - 1) B + S`` and merging stages
removes links from ``S``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

from partition.algorithms.objective import Evaluation, evaluate
from partition.algorithms.problem import IDLE_SHARE, Problem
from partition.devices import Device
from partition.memory import MemoryModel
from partition.schedules.names import is_custom
from partition.stage_plan import StagePlan, stage_graph
from partition.units import format_time

__all__ = ["devices_note", "idle_stages"]


class _Model(Protocol):
    @property
    def num_parameters(self) -> int: ...
    @property
    def param_bytes(self) -> int: ...


class _Plan(Protocol):
    """What this module reads of a `partition.plan.Plan` (which imports this module)."""

    @property
    def model(self) -> _Model: ...
    @property
    def stages(self) -> tuple[StagePlan, ...]: ...
    @property
    def num_stages(self) -> int: ...
    @property
    def devices(self) -> Sequence[Device]: ...
    @property
    def schedule(self) -> str: ...
    @property
    def microbatches(self) -> int: ...
    @property
    def virtual(self) -> int: ...
    @property
    def memory_model(self) -> MemoryModel: ...
    @property
    def algorithm(self) -> str: ...
    @property
    def bottleneck(self) -> float: ...


def idle_stages(plan: _Plan) -> list[int]:
    """The stages of ``plan`` whose compute is at most `IDLE_SHARE` of an even share."""
    share = IDLE_SHARE * sum(s.flops for s in plan.stages) / plan.num_stages
    return [s.index for s in plan.stages if s.flops <= share]


def devices_note(plan: _Plan) -> str | None:
    """What a user should know of ``plan``'s devices: its idle stages, and fewer devices that run
    the model as fast (None when there is nothing to say); see [Note: idle stages]."""
    idle = idle_stages(plan)
    k = plan.num_stages
    used = k - len(idle)
    if idle:
        which = ", ".join(str(s) for s in idle)
        head = (
            f"{len(idle)} of {k} stages are idle (stage{'s' if len(idle) > 1 else ''} {which}: "
            f"at most {IDLE_SHARE:.0%} of an even share of the compute)"
        )
    else:
        head = f"all {k} stages have work"
    if used == 0:
        return f"{head}: the model has almost no compute to split"
    if plan.virtual > 1 or k == 1 or is_custom(plan.schedule):  # a file fixes the rank count
        return head if idle else None
    # The whole model on one device, or else the working stages' devices with the same nodes.
    tried = [_alone(plan), _merged(plan, idle) if idle else None]
    fast = [e for e in tried if e is not None and e.bottleneck <= plan.bottleneck * (1 + 1e-9)]
    if fast:
        fewer = fast[0]
        count = len(fewer.stage_times)
        speed = "as fast" if fewer.bottleneck >= plan.bottleneck * (1 - 1e-9) else "faster"
        alike = len({replace(d, name="") for d in plan.devices}) == 1
        return (
            f"{head}: this model runs {speed} on {count} device{'s' if count > 1 else ''} "
            f"({format_time(fewer.bottleneck)} per micro-batch against "
            f"{format_time(plan.bottleneck)} here: more devices add links, not speed)"
            + (f"; plan with --devices {count}" if alike else "")
        )
    if not idle:
        return None
    if plan.algorithm == "optimal":
        return f"{head}: no split with this bottleneck gives them work"
    return head


def _merged(plan: _Plan, idle: list[int]) -> Evaluation | None:
    """The plan's nodes on its working stages' devices, each idle stage merged into the next
    working one (the last ones into the one before), priced by the partitioner's objective;
    None if that does not fit."""
    working = [s.index for s in plan.stages if s.index not in set(idle)]
    bounds = [0, *(s + 1 for s in working[:-1]), plan.num_stages]  # groups end at working ones
    return _priced(plan, [plan.stages[s].device for s in working], bounds)


def _alone(plan: _Plan) -> Evaluation | None:
    """The whole model on the fastest of the plan's devices that holds it, or None."""
    fits = [e for d in plan.devices if (e := _priced(plan, [d], [0, plan.num_stages]))]
    return min(fits, key=lambda e: e.bottleneck, default=None)


def _priced(plan: _Plan, devices: list[Device], bounds: list[int]) -> Evaluation | None:
    """The plan's stages as nodes of one graph, split at ``bounds`` over ``devices``, priced by
    the partitioner's objective; None if that does not fit."""
    graph = stage_graph(plan.stages, _element_size(plan))
    problem = Problem(
        graph=graph,
        devices=tuple(devices),
        schedule=plan.schedule,
        microbatches=plan.microbatches,
        memory=plan.memory_model,
    )
    evaluation = evaluate(problem, bounds)
    return evaluation if evaluation.fits else None


def _element_size(plan: _Plan) -> float:
    model = plan.model
    return model.param_bytes / model.num_parameters if model.num_parameters else 4.0
