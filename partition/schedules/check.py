"""Checking a schedule with no process at all: `validate` (every action's inputs are made
before it, every send has its receive, no rank waits forever) and `check_channel_order` (each
link carries micro-batches in the order both ends expect).

A schedule that fails says where: the rank, the step, the action, and a window of the step ×
rank table around it (`Schedule.table`).
"""

from __future__ import annotations

import collections

from partition.errors import PlanError
from partition.schedules.actions import Action, Kind, Schedule

__all__ = ["check_channel_order", "validate"]


def _fail(schedule: Schedule, rank: int, step: int, message: str) -> PlanError:
    action = schedule.actions[rank][step]
    window = schedule.table(mark=(rank, step), steps=range(step - 4, step + 5))
    return PlanError(f"[rank {rank} · step {step} · {action}] {message}\n{window}")


_Key = tuple[str, int, int]  # (code, stage, micro-batch); I is filed under "B"
_PEER = {Kind.SEND_F: 1, Kind.RECV_B: 1, Kind.RECV_F: -1, Kind.SEND_B: -1}
_MATCH = {Kind.SEND_F: "RF", Kind.RECV_F: "SF", Kind.SEND_B: "RB", Kind.RECV_B: "SB"}


def _key(a: Action) -> _Key:
    return ("B" if a.kind is Kind.I else a.kind.value, a.stage, a.microbatch)


def _needs(a: Action, schedule: Schedule, rank: int, comm: bool) -> list[tuple[_Key, bool]]:
    """What ``a`` waits for, each with whether it must come earlier on the same rank."""
    s, i, kind = a.stage, a.microbatch, a.kind
    if kind in (Kind.SEND_F, Kind.SEND_B):
        return [(("F" if kind is Kind.SEND_F else "B", s, i), True)]
    if kind in _PEER:
        return [((_MATCH[kind], s + _PEER[kind], i), False)]
    if kind is Kind.W:
        return [(("B", s, i), True)]
    code, src = ("F", s - 1) if kind is Kind.F else ("B", s + 1)
    needs = [] if kind is Kind.F else [(("F", s, i), True)]
    if 0 <= src < schedule.num_stages:
        if schedule.stage_to_rank(src) == rank:
            needs.append(((code, src, i), True))
        else:  # from another rank: through this rank's receive, or straight from the producer
            needs.append((("R" + code, s, i), True) if comm else ((code, src, i), False))
    return needs


def _check_structure(schedule: Schedule) -> bool:
    """Placement, one F and one B (or I and W) per (stage, mb), sends matched by receives."""
    S, m, p, rank_of = (
        schedule.num_stages,
        schedule.num_microbatches,
        schedule.num_ranks,
        schedule.stage_to_rank,
    )
    seen: dict[_Key, tuple[int, int]] = {}
    for r, row in enumerate(schedule.actions):
        for k, a in enumerate(row):
            s, peer = a.stage, a.stage + _PEER.get(a.kind, 0)
            if not (0 <= s < S and 0 <= a.microbatch < m):
                raise _fail(
                    schedule, r, k, f"stage must be in 0..{S - 1}, micro-batch in 0..{m - 1}"
                )
            if rank_of(s) != r:
                rule = (
                    f"s % {p}"
                    if schedule.placement == "loop"
                    else f"V placement: rank r holds r and {2 * p - 1} - r"
                )
                raise _fail(
                    schedule, r, k, f"stage {s} lives on rank {rank_of(s)} ({rule}); move it there"
                )
            if a.kind in _PEER and not (0 <= peer < S and rank_of(peer) != r):
                raise _fail(schedule, r, k, f"there is no stage {peer} on another rank to talk to")
            for key in {(a.kind.value, s, a.microbatch), _key(a)}:
                if key in seen:
                    raise _fail(schedule, r, k, "duplicate of rank {} step {}".format(*seen[key]))
                seen[key] = (r, k)
    for s in range(S):
        for i in range(m):
            for code, what in (("F", "forward"), ("B", "backward")):
                if code == "B" and ("B", s, i) not in seen:  # a leak: point at its forward
                    raise _fail(
                        schedule,
                        *seen[("F", s, i)],
                        f"this forward has no backward, its activations would leak; add "
                        f"{s}B{i} (or {s}I{i} and {s}W{i}) after it on rank {rank_of(s)}",
                    )
                if (code, s, i) not in seen:
                    raise PlanError(
                        f"stage {s} micro-batch {i} has no {what}; add {s}{code}{i} on rank {rank_of(s)}"
                    )
            if (("I", s, i) in seen) != (("W", s, i) in seen):
                have, lack = ("I", "W") if ("I", s, i) in seen else ("W", "I")
                raise _fail(
                    schedule, *seen[(have, s, i)], f"no {s}{lack}{i} to pair with it; add one"
                )
    comm = [
        (Kind(c), s, i, where) for (c, s, i), where in seen.items() if c in ("SF", "RF", "SB", "RB")
    ]
    for kind, s, i, (r, k) in comm:
        peer = s + _PEER[kind]
        if (_MATCH[kind], peer, i) not in seen:
            raise _fail(
                schedule, r, k, f"no matching {peer}{_MATCH[kind]}{i} on rank {rank_of(peer)}"
            )
    return bool(comm)


def validate(schedule: Schedule) -> None:
    """Check a schedule statically; raise pointing at the offending rank and step.

    Checks: every action on the rank holding its stage; one F and one B (or one I and one W)
    per (stage, micro-batch); every send matched by one receive (peer, micro-batch, direction);
    and a static execution (sends never block, receives block until their send has run, each
    rank advances while it can) that respects every dependency and ends without deadlock. A
    schedule without communication actions runs as :func:`with_communication` would make it.

    Raises:
        PlanError: naming rank, step and action, above the nearby rows of :meth:`Schedule.table`.
    """
    comm = _check_structure(schedule)
    done: set[_Key] = set()
    waiting: dict[_Key, list[int]] = {}  # key -> ranks blocked until it is done
    blocked: dict[int, _Key] = {}
    ptr = [0] * schedule.num_ranks
    ready = list(range(schedule.num_ranks))[::-1]
    while ready:
        r = ready.pop()
        row = schedule.actions[r]
        while ptr[r] < len(row):
            a = row[ptr[r]]
            for (code, s, i), same_rank in _needs(a, schedule, r, comm):
                if (code, s, i) in done:
                    continue
                if same_rank:
                    raise _fail(
                        schedule,
                        r,
                        ptr[r],
                        f"needs {s}{code}{i} before it on rank {r}; add or move it",
                    )
                blocked[r] = (code, s, i)
                waiting.setdefault(blocked[r], []).append(r)
                break
            else:
                done.add(_key(a))
                ready.extend(waiting.pop(_key(a), []))
                ptr[r] += 1
                continue
            break
    stuck = [r for r in range(schedule.num_ranks) if ptr[r] < len(schedule.actions[r])]
    if stuck:
        why = "; ".join(
            f"rank {r} step {ptr[r]} ({schedule.actions[r][ptr[r]]}) waits for "
            f"{s}{code}{i} on rank {schedule.stage_to_rank(s)}"
            for r in stuck
            for code, s, i in [blocked[r]]
        )
        raise _fail(schedule, stuck[0], ptr[stuck[0]], f"deadlock, no rank can advance: {why}")


def check_channel_order(schedule: Schedule) -> None:
    """Sends and receives of every link carry micro-batches in the same order; see [Note: same-peer exchange]."""
    order: dict[tuple[str, int], list[int]] = collections.defaultdict(list)
    for row in schedule.actions:
        for a in row:
            if a.kind is Kind.SEND_F:
                order["F", a.stage].append(a.microbatch)
            elif a.kind is Kind.RECV_F:
                order["F-recv", a.stage - 1].append(a.microbatch)
            elif a.kind is Kind.SEND_B:
                order["B", a.stage].append(a.microbatch)
            elif a.kind is Kind.RECV_B:
                order["B-recv", a.stage + 1].append(a.microbatch)
    for (kind, s), sent in order.items():
        if kind in ("F", "B") and order.get((f"{kind}-recv", s)) != sent:
            raise PlanError(
                f"schedule {schedule.name!r}: stage {s} sends {'activations' if kind == 'F' else 'gradients'} "
                f"for micro-batches {sent} but they are received in the order {order.get((f'{kind}-recv', s))}"
            )
