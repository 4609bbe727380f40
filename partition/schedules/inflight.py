"""How many micro-batches each stage holds at peak: the schedule's own count, and closed forms.

[Note: in-flight counts come from the schedule]
What a stage holds is a fact about the schedule's action lists, so the one source of it is the
schedule: `partition.schedules.actions.peak_inflight`, which the runtime's buffer pools are
sized by too, and which the partitioner prices (`schedule_inflight`). The closed forms
(`closed_form_inflight`, see [Note: stage memory] in `partition.memory`) equal the schedule's for
GPipe, 1F1B, ZB-H1, ZB-V and DualPipeV (``tests/partition/test_inflight.py`` and
``tests/partition/test_vshape.py`` check every p <= 8, m <= 32) and
bound interleaved's from above; they price a count the schedule cannot run (interleaved needs
the micro-batches to be a multiple of the ranks), so the search for the fewest devices that fit
can still compare it.
"""

from __future__ import annotations

import functools

from partition.errors import PlanError
from partition.schedules.actions import peak_inflight
from partition.schedules.custom import schedule_for
from partition.schedules.names import V_SCHEDULES, canonical_schedule, is_custom

__all__ = ["closed_form_inflight", "inflight_microbatches", "schedule_inflight"]


@functools.lru_cache(maxsize=256)
def schedule_inflight(
    schedule: str, ranks: int, microbatches: int, virtual: int = 1
) -> tuple[int, ...]:
    """The peak micro-batches each of the ``ranks * virtual`` stages holds under ``schedule``:
    `peak_inflight` of its actions, or the closed form for a count it cannot run."""
    try:
        built = schedule_for(schedule, ranks, microbatches, virtual)
    except PlanError:
        if is_custom(canonical_schedule(schedule)):  # no closed form: its own counts or nothing
            raise
        return closed_form_inflight(schedule, ranks, microbatches, virtual)
    return tuple(peak_inflight(built))


def inflight_microbatches(
    schedule: str, stage: int, num_stages: int, microbatches: int, virtual: int = 1
) -> int:
    """Peak micro-batches whose activations ``stage`` keeps alive. See [Note: stage memory].

    For ``interleaved``, ``num_stages`` counts virtual stages (``ranks * virtual``).
    """
    schedule = canonical_schedule(schedule)
    if microbatches < 1:
        raise PlanError(f"micro-batches must be at least 1, got {microbatches}")
    if not 0 <= stage < num_stages:
        raise PlanError(f"stage {stage} out of range for {num_stages} stages")
    if schedule == "gpipe":
        return microbatches
    if schedule == "1f1b" or schedule in V_SCHEDULES:  # V: 1F1B's count over the 2p stages
        return min(num_stages - stage, microbatches)
    if (
        schedule == "zb-h1"
    ):  # every stage holds p: its W runs late (see partition.schedules.actions)
        return min(num_stages, microbatches)
    if virtual < 1 or num_stages % virtual:
        raise PlanError(f"{num_stages} virtual stages do not divide into {virtual} per rank")
    ranks = num_stages // virtual
    rank = stage % ranks
    warmup = 2 * (ranks - rank - 1) + (virtual - 1) * ranks + 1
    return min(microbatches, warmup)


def closed_form_inflight(
    schedule: str, ranks: int, microbatches: int, virtual: int = 1
) -> tuple[int, ...]:
    """`inflight_microbatches` of every stage; see [Note: in-flight counts come from the schedule]."""
    if canonical_schedule(schedule) in V_SCHEDULES:
        virtual = 2  # from the default 1, as `build_schedule` takes it
    stages = ranks * virtual
    return tuple(
        inflight_microbatches(schedule, s, stages, microbatches, virtual) for s in range(stages)
    )
