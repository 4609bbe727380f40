"""Where a schedule sends and receives: `with_communication` adds the messages between stages on
different ranks (none between stages of one rank: see [Note: placement] in
`partition.schedules.placement`), `overlap_pairs` makes DualPipeV's pairs wait for both inputs.
"""

from __future__ import annotations

import dataclasses

from partition.schedules.schedule import _COMPUTE, Action, Kind, Schedule, _bulk

__all__ = ["overlap_pairs", "with_communication"]


@_bulk
def with_communication(schedule: Schedule) -> Schedule:
    """Insert sends and receives where a stage's neighbour lives on another rank.

    A RECV goes right before the compute that needs it, a SEND right after the compute that
    produced it. Sends are asynchronous; receives block until the matching send is issued.
    A schedule that already has communication actions is returned unchanged.
    """
    if any(a.kind not in _COMPUTE for row in schedule.actions for a in row):
        return schedule
    rank_of, rows = schedule.stage_to_rank, []
    for r, row in enumerate(schedule.actions):
        out: list[Action] = []
        for a in row:
            fwd, s, i = a.kind is Kind.F, a.stage, a.microbatch
            src, dst = (s - 1, s + 1) if fwd else (s + 1, s - 1)  # input from, output to
            talks = a.kind is not Kind.W
            if talks and 0 <= src < schedule.num_stages and rank_of(src) != r:
                out.append(Action(s, Kind.RECV_F if fwd else Kind.RECV_B, i))
            out.append(a)
            if talks and 0 <= dst < schedule.num_stages and rank_of(dst) != r:
                out.append(Action(s, Kind.SEND_F if fwd else Kind.SEND_B, i))
        rows.append(tuple(out))
    return dataclasses.replace(schedule, actions=tuple(rows))


def overlap_pairs(schedule: Schedule) -> Schedule:
    """``schedule`` with communication, each overlapped pair (a forward right before a backward
    of the rank's other stage) waiting for both its inputs before it starts: the backward's
    receive moved ahead of the forward's. See [Note: DualPipeV's overlapped pair] in
    `partition.schedules.vshape`."""
    rows = []
    for row in with_communication(schedule).actions:
        out: list[Action] = []
        for a in row:
            if a.kind is Kind.RECV_B and len(out) >= 2 and out[-1].kind in (Kind.F, Kind.SEND_F):
                k = len(out) - (2 if out[-1].kind is Kind.SEND_F else 1)  # the pair's forward
                if k > 0 and out[k - 1].kind is Kind.RECV_F:  # and its receive
                    k -= 1
                if out[k].stage != a.stage:
                    out.insert(k, a)
                    continue
            out.append(a)
        rows.append(tuple(out))
    return dataclasses.replace(schedule, actions=tuple(rows))
