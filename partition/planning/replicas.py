"""The time of the gradient reduction over replicas: a ring all-reduce per bucket, priced by the
link model, and the part of it that the rest of the backward does not hide.

[Note: predicting the reduction over replicas]
With ``dp`` replicas each rank all-reduces its stages' gradients with the ranks holding the
same stages in the other replicas (`pipeline.parallel.reduce`), in buckets of at most
`BUCKET_BYTES`, one collective at a time. A ring all-reduce of ``n`` bytes over ``D`` ranks
sends and receives ``2 (D - 1) / D · n`` bytes per rank in ``2 (D - 1)`` steps, so one bucket
takes ``2 (D - 1) / D · n / bandwidth + 2 (D - 1) · latency``, with the stage's device's link
(``Device.bandwidth``, ``Device.latency``: the replicas are assumed to be as well connected as
the pipeline's neighbours, and the reduction is assumed not to slow the point-to-point traffic
it overlaps). A stage's buckets can start when its last backward (B, or W under a split
backward) ends (``when="stage"``: the simulated timeline of the plan's schedule says when), or
all after the rank's schedule (``when="end"``); a rank's buckets then run back to back in that
order. The step ends when the last rank's last bucket does, if that is after the schedule: the
difference is the reduction's exposed time, added to the plan's predicted step. With ``dp = 1``
nothing is reduced.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

from partition.errors import PlanError
from partition.plan import Plan
from partition.schedules.actions import Kind
from partition.schedules.simulate import SimResult

__all__ = [
    "BUCKET_BYTES",
    "REDUCE_WHEN",
    "ReducePrediction",
    "ReduceWhen",
    "bucket_sizes",
    "predict_reduction",
    "ring_allreduce_time",
]

BUCKET_BYTES = 25 * 2**20
"""The most gradient bytes per all-reduce (DDP's ``bucket_cap_mb`` default), the runtime's too."""

ReduceWhen = Literal["stage", "end"]
"""When a rank's gradient reduction starts: as each stage's last backward ends, or after the
rank's whole schedule; see [Note: predicting the reduction over replicas]."""
REDUCE_WHEN: tuple[ReduceWhen, ...] = ("stage", "end")


def ring_allreduce_time(nbytes: float, dp: int, bandwidth: float, latency: float) -> float:
    """Seconds of one ring all-reduce of ``nbytes`` over ``dp`` ranks (0 for one rank)."""
    if dp <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (dp - 1) / dp * nbytes / bandwidth + 2 * (dp - 1) * latency


def bucket_sizes(nbytes: int, bucket_bytes: int = BUCKET_BYTES) -> list[int]:
    """``nbytes`` of gradients cut into buckets of at most ``bucket_bytes`` (the runtime fills
    buckets parameter by parameter, so its buckets can be smaller; a larger parameter has one of
    its own)."""
    full, rest = divmod(max(nbytes, 0), bucket_bytes)
    return [bucket_bytes] * full + ([rest] if rest else [])


@dataclass(frozen=True)
class ReducePrediction:
    """The reduction over ``dp`` replicas of one step of a plan."""

    dp: int
    when: ReduceWhen
    stage_time: tuple[float, ...]
    """Per stage, seconds of all-reduce of its gradients."""
    finish: tuple[float, ...]
    """Per rank, when its last bucket is reduced, on the step's clock (0: nothing to reduce)."""
    schedule_time: float
    """The simulated schedule, without the reduction."""
    exposed: float
    """Seconds the reduction adds to the step: what ends after the schedule."""

    def to_dict(self) -> dict[str, object]:
        return {
            "dp": self.dp,
            "when": self.when,
            "stage_time": list(self.stage_time),
            "finish": list(self.finish),
            "schedule_time": self.schedule_time,
            "exposed": self.exposed,
        }


def predict_reduction(
    plan: Plan, dp: int, *, when: ReduceWhen = "stage", simulated: SimResult | None = None
) -> ReducePrediction:
    """The time of ``plan``'s gradient reduction over ``dp`` replicas; see [Note: predicting the
    reduction over replicas].

    Args:
        simulated: the plan's simulated schedule (`partition.planning.predict.simulate_plan`),
            when already at hand.

    Raises:
        PlanError: ``dp`` below 1 or an unknown ``when``.
    """
    if dp < 1:
        raise PlanError(f"dp must be at least 1 (replicas of the pipeline), got {dp}")
    if when not in REDUCE_WHEN:
        raise PlanError(f"when must be one of {', '.join(map(repr, REDUCE_WHEN))}, got {when!r}")
    if simulated is None:
        from partition.planning.predict import simulate_plan

        simulated = simulate_plan(plan)
    stage_buckets = [
        [
            ring_allreduce_time(b, dp, s.device.bandwidth, s.device.latency)
            for b in bucket_sizes(s.param_bytes)
        ]
        for s in plan.stages
    ]
    ready = _ready_times(simulated, plan, when)
    points: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for s in range(len(plan.stages)):
        points[plan.stage_rank(s)].append((ready[s], s))
    finish = [0.0] * plan.num_ranks
    for rank, order in points.items():
        clock = 0.0
        for start, s in sorted(order):
            if stage_buckets[s]:  # one collective at a time, in the order they are ready
                clock = max(clock, start) + sum(stage_buckets[s])
        finish[rank] = clock
    schedule_time = float(simulated.step_time)
    return ReducePrediction(
        dp=dp,
        when=when,
        stage_time=tuple(float(sum(b)) for b in stage_buckets),
        finish=tuple(finish),
        schedule_time=schedule_time,
        exposed=max(0.0, max(finish, default=0.0) - schedule_time),
    )


def _ready_times(simulated: SimResult, plan: Plan, when: ReduceWhen) -> list[float]:
    """Per stage, when its gradients are complete (its last B or W ends), or with
    ``when="end"`` when its rank's last event ends."""
    last_backward = [0.0] * len(plan.stages)
    rank_end = [0.0] * plan.num_ranks
    for rank, action, _, end in simulated.timeline:
        rank_end[rank] = max(rank_end[rank], end)
        if action.kind in (Kind.B, Kind.W):
            last_backward[action.stage] = max(last_backward[action.stage], end)
    if when == "end":
        return [rank_end[plan.stage_rank(s)] for s in range(len(plan.stages))]
    return last_backward
