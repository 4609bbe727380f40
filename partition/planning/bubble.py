"""When a plan's pipeline idles: how many micro-batches, or which schedule, would fill it.

[Note: a plan that says when it is poor]
A plan of ``p`` stages and ``m`` micro-batches idles for about ``(p - 1) / (m + p - 1)`` of its
step under GPipe and 1F1B (16 stages, 4 micro-batches: 79 %): optimal for its micro-batches, and
poor. When the plan's predicted bubble is above `POOR_BUBBLE`, `bubble_note` runs the same
simulator on the same stage times with more micro-batches (doubling, up to 64 times as many) and
with the other schedules that the same split can run (``gpipe``, ``1f1b``, ``zb-h1``; for a V
plan, ``zb-v`` and ``dualpipev``), and says
the fewest micro-batches and the schedules that bring it under — or, when none does (links
or one slow stage set the step), that none does and the least it reached. The bubble fraction does not
depend on the micro-batch's size when every stage's time scales with it, so the answer holds for
the same batch cut finer (while a micro-batch stays large enough to keep a device busy) and for a
larger batch of micro-batches this size alike. Fixed costs per action do not scale, so with a
calibrated device the finer cut is slightly optimistic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from partition.errors import PlanError
from partition.schedules.names import V_SCHEDULES, is_custom

if TYPE_CHECKING:
    from partition.plan import Plan

__all__ = ["POOR_BUBBLE", "bubble_note"]

POOR_BUBBLE = 0.20
"""A predicted bubble above this share of the step is worth a note."""
_SAME_SPLIT = ("gpipe", "1f1b", "zb-h1")


def bubble_note(plan: Plan) -> str | None:
    """How to bring ``plan``'s bubble under `POOR_BUBBLE`, or that nothing tried does (None when
    it is under already); see [Note: a plan that says when it is poor]."""
    from partition.planning.predict import simulate_plan

    if plan.bubble <= POOR_BUBBLE or plan.num_stages < 2:
        return None
    m = plan.microbatches
    enough, least = None, (m, plan.bubble)
    for factor in () if is_custom(plan.schedule) else (2, 4, 8, 16, 32, 64):  # a file's m is fixed
        if plan.schedule == "interleaved" and (m * factor) % plan.num_ranks:
            continue
        bubble = simulate_plan(plan, microbatches=m * factor).bubble_fraction
        least = min(least, (m * factor, bubble), key=lambda t: t[1])
        if bubble <= POOR_BUBBLE:
            enough = (m * factor, bubble)
            break
    schedules = []
    same = _SAME_SPLIT if plan.virtual == 1 else V_SCHEDULES if plan.placement == "v" else ()
    if same:  # the schedules that run this split: one stage per rank, or the V
        for name in same:  # a written schedule, like any other, may compare them
            if name == plan.schedule:
                continue
            try:
                bubble = simulate_plan(plan, schedule=name).bubble_fraction
            except PlanError:
                continue
            if bubble <= POOR_BUBBLE:
                schedules.append(f"--schedule {name} ({bubble:.0%})")
    head = f"bubble {plan.bubble:.0%} with {m} micro-batches over {plan.num_stages} stages: "
    if enough is None and not schedules:
        counts = "" if is_custom(plan.schedule) else f" and no micro-batch count up to {64 * m}"
        return head + (
            f"no schedule of this split{counts} brings it under {POOR_BUBBLE:.0%} (the least: "
            f"{least[1]:.0%} with {least[0]}); what remains is the links' time or the slowest "
            "stage's"
        )
    ways = []
    if enough is not None:
        ways.append(
            f"--microbatches {enough[0]} brings it to {enough[1]:.0%} (the batch cut finer, or "
            "a larger batch)"
        )
    ways += schedules
    return head + "; ".join(ways)
