"""Schedules a user writes: a file's per-rank action text, parsed and checked against the run.

See [Note: a schedule a user writes] in `partition.schedules.names`. A 2-rank 1F1B with 4
micro-batches, as `Schedule.to_text` prints it and as a file holds it::

    0F0 0F1 0B0 0F2 0B1 0F3 0B2 0B3
    1F0 1B0 1F1 1B1 1F2 1B2 1F3 1B3

Line r is rank r; stage s runs on rank ``s % ranks`` (looping placement), so a file with
``ranks × v`` stages is a schedule with ``v`` stages per rank. A line ``# placement: v`` (where
`Schedule.to_text` of a V schedule puts it, first) declares the V placement instead: 2 stages
per rank, rank r holding stages r and ``2 ranks - 1 - r`` (see [Note: placement] in
`partition.schedules.placement`); a 2-rank ZB-V with 2 micro-batches::

    # placement: v
    0F0 0F1 3F0 3I0 3W0 3F1 3I1 3W1 0I0 0W0 0I1 0W1
    1F0 2F0 1F1 2F1 2I0 2W0 1I0 1W0 2I1 2W1 1I1 1W1

The micro-batch count is the largest micro-batch named + 1, and must equal the run's.
"""

from __future__ import annotations

from partition.errors import PlanError
from partition.schedules.actions import Action, Schedule, build_schedule, with_communication
from partition.schedules.check import check_channel_order, validate
from partition.schedules.names import CUSTOM_SCHEDULE, canonical_schedule, is_custom
from partition.schedules.placement import read_placement

__all__ = ["custom_schedule", "custom_virtual", "parse_custom", "schedule_for"]


def schedule_for(name: str, num_ranks: int, num_microbatches: int, virtual: int = 1) -> Schedule:
    """The schedule ``name`` names: a built-in one (`build_schedule`), or a schedule's text or
    ``@FILE`` (`custom_schedule`, validated). What the planner, simulator and runtime build."""
    key = canonical_schedule(name)
    if is_custom(key):
        return custom_schedule(key, num_ranks, num_microbatches, virtual)
    return build_schedule(key, num_ranks, num_microbatches, virtual)


def parse_custom(text: str) -> Schedule:
    """The schedule ``text`` (or ``@FILE``) holds, its counts those the text names; not validated.

    Raises:
        PlanError: unreadable or unparseable, or a stage count that is not a multiple of ranks.
    """
    text = canonical_schedule(text)
    placement, rows = read_placement(text)
    for r, line in enumerate(rows.split("\n")):
        for step, token in enumerate(line.split()):
            try:
                Action.parse(token)
            except PlanError as e:
                raise PlanError(f"the schedule file: rank {r} step {step}: {e}") from e
    if placement == "v":
        return _parse_v(text)
    schedule = Schedule.from_text(text, name=CUSTOM_SCHEDULE)
    if schedule.num_stages % schedule.num_ranks:
        raise PlanError(
            f"the schedule file names stages 0..{schedule.num_stages - 1} on "
            f"{schedule.num_ranks} ranks; stage s runs on rank s % {schedule.num_ranks}, so the "
            "stage count must be a multiple of the ranks (one line per rank)"
        )
    return schedule


def _parse_v(text: str) -> Schedule:
    ranks = len(read_placement(text)[1].split("\n"))
    try:
        return Schedule.from_text(text, name=CUSTOM_SCHEDULE, num_stages=2 * ranks)
    except PlanError as e:
        raise PlanError(
            f"the schedule file declares the V placement (2 stages per rank, stages 0..{2 * ranks - 1} "
            f"on its {ranks} lines): {e}"
        ) from e


def custom_virtual(text: str) -> int:
    """Stages per rank of the schedule ``text``: its stage count over its ranks."""
    schedule = parse_custom(text)
    return schedule.num_stages // schedule.num_ranks


def custom_schedule(text: str, num_ranks: int, num_microbatches: int, virtual: int) -> Schedule:
    """The schedule ``text`` holds, for a run of ``num_ranks`` × ``virtual`` stages and
    ``num_microbatches`` micro-batches, validated (`partition.schedules.check.validate`).

    Raises:
        PlanError: the counts differ from the run's, or the schedule deadlocks, leaks a forward
            without its backward, misses a micro-batch or names a stage out of range; the
            message names the rank and the step.
    """
    parsed = parse_custom(text)
    if parsed.num_ranks != num_ranks:
        raise PlanError(
            f"the schedule file has {parsed.num_ranks} lines (one per rank) but the run has "
            f"{num_ranks} ranks; use --ranks {parsed.num_ranks} (or that many devices), or "
            f"write {num_ranks} lines"
        )
    if parsed.num_microbatches != num_microbatches:
        raise PlanError(
            f"the schedule file runs micro-batches 0..{parsed.num_microbatches - 1} "
            f"({parsed.num_microbatches}) but the run has {num_microbatches}; use "
            f"--microbatches {parsed.num_microbatches}, or write the schedule for "
            f"{num_microbatches}"
        )
    schedule = Schedule.from_text(
        canonical_schedule(text),
        name=CUSTOM_SCHEDULE,
        num_microbatches=num_microbatches,
        num_stages=num_ranks * virtual,
    )
    validate(schedule)
    check_channel_order(with_communication(schedule))
    return schedule
