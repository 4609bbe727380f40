"""Schedule simulation: run the same per-rank action lists on a simulated clock.

Each rank is one compute stream that runs its list in order. A send occupies the link from
its rank to the peer's, not the rank: it starts when the producing compute ends and the link
is free, and arrives ``comm_time`` later; sends on one link go one at a time, in the sender's
order. A receive blocks its rank until the data has arrived. A schedule without
communication actions is simulated exactly as :func:`~partition.schedules.actions.with_communication`
would make it (receive right before the consumer, send right after the producer), without
building the extra actions.

[Note: simulator speed] The clock is a longest path through the schedule's dependency graph.
It is computed in rounds with numpy: each round every rank whose next action is ready (its
cross-rank input has been produced in an earlier round) runs it. That is O(total actions)
work in O(actions per rank + pipeline depth) vectorised rounds, so 1,024 stages × 4,096
micro-batches take seconds; converting the schedule's Action objects to arrays is part of it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from operator import attrgetter

import numpy as np
import numpy.typing as npt

from partition.errors import PlanError
from partition.schedules.schedule import Action, Kind, Schedule, _bulk

__all__ = ["SimResult", "TimelineEvent", "simulate"]

TimelineEvent = tuple[int, Action, float, float]
"""``(rank, action, start, end)`` in seconds; the runtime records the same tuples."""

_F, _B, _I, _W, _SF, _RF, _SB, _RB = range(8)
_CODE = {k: n for n, k in enumerate(Kind)}  # Kind is declared in the order F B I W SF RF SB RB
_HELD = np.array([1, -1, 0, -1, 0, 0, 0, 0])  # micro-batches held: +1 at F, -1 at B or W, by kind

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]


@dataclass(frozen=True)
class _Trace:
    """The arrays a timeline is built from, kept so that it is built only when asked for."""

    schedule: Schedule
    explicit: bool  # the schedule has its own communication actions
    start: Floats
    end: Floats
    send_start: Floats
    arrival: Floats  # when the output is usable by its consumer (== end unless it is sent)
    waits: npt.NDArray[np.bool_]  # receives before it (implicit communication)
    sends: npt.NDArray[np.bool_]  # sends after it (implicit communication)


@dataclass(frozen=True)
class SimResult:
    """What :func:`simulate` found. Times are in the units of the inputs (seconds)."""

    step_time: float
    """From the first action to the last event of the step."""
    bubble_fraction: float
    """``1 - total compute / (num_ranks * step_time)``."""
    busy_time: tuple[float, ...]
    """Compute time per rank."""
    peak_activation_microbatches: tuple[int, ...]
    """Per stage, the most micro-batches forwarded and not yet fully backward-ed."""
    peak_activation_bytes: tuple[float, ...] | None
    """Per stage, ``peak_activation_microbatches × activation_bytes`` when those were given."""
    _trace: _Trace = field(repr=False, compare=False)

    @functools.cached_property
    def timeline(self) -> list[TimelineEvent]:
        """Every compute and communication event, rank by rank in each rank's order.

        A send's event is its time on the link (start to arrival); a receive's is the time its
        rank waited (zero-length when the data was already there). Built on first access.
        """
        return _timeline(self._trace)


def _per(value: float | Sequence[float], n: int, what: str, unit: str) -> Floats:
    if isinstance(value, int | float):
        out = np.full(n, float(value))
    else:
        out = np.asarray(value, dtype=np.float64)
        if out.shape != (n,):
            raise PlanError(
                f"{what} has {len(out)} values but the schedule has {n} {unit}s; "
                f"give one per {unit} or a single number"
            )
    if n and (not np.isfinite(out).all() or out.min() < 0):
        raise PlanError(f"{what} must be finite and >= 0, got {out.tolist()}")
    return out


def simulate(
    schedule: Schedule,
    *,
    forward_time: float | Sequence[float],
    backward_time: float | Sequence[float],
    weight_time: float | Sequence[float] | None = None,
    comm_time: float | Sequence[float] = 0.0,
    activation_bytes: float | Sequence[float] | None = None,
) -> SimResult:
    """Simulate one training step of ``schedule``; see [Note: simulator speed].

    Args:
        schedule: with or without communication actions; it should pass
            :func:`~partition.schedules.check.validate` (only deadlocks and missing producers are
            detected here).
        forward_time: seconds of one micro-batch's F, one number or one per stage.
        backward_time: seconds of one micro-batch's full backward (B), one number or one per
            stage. In a zero-bubble schedule I takes ``backward_time - weight_time`` and W takes
            ``weight_time``, so the same arguments compare schedules fairly.
        weight_time: the weight-gradient share of the backward; default half of it.
        comm_time: seconds to move one micro-batch's boundary tensors across cut s (between
            stage s and s + 1), one number or one per cut; the same for gradients.
        activation_bytes: bytes of activations one micro-batch keeps on each stage.

    Returns:
        A :class:`SimResult`.

    Raises:
        PlanError: bad times, a schedule the simulator cannot run, or a deadlock.
    """
    S, m, p = schedule.num_stages, schedule.num_microbatches, schedule.num_ranks
    f = _per(forward_time, S, "forward_time", "stage")
    b = _per(backward_time, S, "backward_time", "stage")
    w = b / 2 if weight_time is None else _per(weight_time, S, "weight_time", "stage")
    c = _per(comm_time, S - 1, "comm_time", "cut")
    if (w > b).any():
        raise PlanError(
            f"weight_time {w.tolist()} exceeds backward_time {b.tolist()}; W is part of B"
        )
    per_mb_bytes = None
    if activation_bytes is not None:
        per_mb_bytes = _per(activation_bytes, S, "activation_bytes", "stage")
    durations = np.zeros((8, S))
    durations[_F], durations[_B], durations[_I], durations[_W] = f, b, b - w, w

    flat = list(chain.from_iterable(schedule.actions))
    n = len(flat)
    stage = np.fromiter(map(attrgetter("stage"), flat), np.int64, n)
    mb = np.fromiter(map(attrgetter("microbatch"), flat), np.int64, n)
    kind = np.fromiter(map(_CODE.__getitem__, map(attrgetter("kind"), flat)), np.int64, n)
    lens = np.array([len(row) for row in schedule.actions], dtype=np.int64)
    rank = np.repeat(np.arange(p), lens)
    home = np.array([schedule.stage_to_rank(s) for s in range(S)], dtype=np.int64)
    in_range = n == 0 or (stage.min() >= 0 and stage.max() < S and mb.min() >= 0 and mb.max() < m)
    if not in_range or (home[stage] != rank).any():
        raise PlanError(
            f"schedule {schedule.name!r} is malformed; run validate(schedule) to see where"
        )
    explicit = bool((kind >= _SF).any())
    kind_stage = kind * S + stage
    dep, link, ctime, waits = _wiring(stage, mb, kind_stage, explicit, c, home, m, p)
    dur = durations.ravel()[kind_stage]
    start, end, send_start, arrival = _run(dep, link, ctime, dur, lens, p, schedule)

    busy = np.bincount(rank, weights=dur, minlength=p)  # communication has zero duration
    step = float(max(end.max(), arrival.max())) if n else 0.0
    peak = _peak(stage, kind, S)
    nbytes = None if per_mb_bytes is None else tuple((peak * per_mb_bytes).tolist())
    return SimResult(
        step_time=step,
        bubble_fraction=1.0 - float(busy.sum()) / (p * step) if step > 0 else 0.0,
        busy_time=tuple(busy.tolist()),
        peak_activation_microbatches=tuple(peak.tolist()),
        peak_activation_bytes=nbytes,
        _trace=_Trace(schedule, explicit, start, end, send_start, arrival, waits, link < 2 * p),
    )


def _wiring(
    stage: Ints, mb: Ints, kind_stage: Ints, explicit: bool, c: Floats, home: Ints, m: int, p: int
) -> tuple[Ints, Ints, Floats, npt.NDArray[np.bool_]]:
    """Per action: the cross-rank action it waits for, the link it sends on, and for how long.

    Built from small ``[kind, stage]`` tables, then gathered per action. "None" is the
    sentinel ``n`` for ``dep`` (one past the last action) and ``2 p`` for ``link``, so that the
    clock loop needs no masks. Links are numbered ``2 r`` (rank r to r + 1) and ``2 r + 1``
    (rank r to r - 1): one per ordered pair of ranks. ``home`` is each stage's rank (any
    placement whose neighbours are one rank apart, or on one rank: loop and V).
    """
    n, S = len(stage), len(home)
    cross_before = np.append(False, home[1:] != home[:-1])  # stage s - 1 is on another rank
    cross_after = np.append(home[:-1] != home[1:], False)  # stage s + 1 is on another rank
    to_next = (home + 1) % p
    link_after = np.where(cross_after, 2 * home + (np.roll(home, -1) != to_next), 2 * p)
    link_before = np.where(cross_before, 2 * home + (np.roll(home, 1) != to_next), 2 * p)
    c_after = np.where(cross_after, np.append(c, 0.0), 0.0)  # cut s follows stage s
    c_before = np.where(cross_before, np.append(0.0, c), 0.0)
    wait = np.zeros((8, S), dtype=np.int64)  # -1: waits for stage s - 1, +1: for s + 1
    link = np.full((8, S), 2 * p, dtype=np.int64)
    ctime = np.zeros((8, S))
    valid = np.ones((8, S), dtype=bool)
    produces = np.full(8, -1, dtype=np.int64)  # 0: forward outputs, 1: input-gradients
    if explicit:  # receives wait for sends; sends use the links
        wait[_RF], wait[_RB] = -1, 1
        sender_f, sender_b = [_SF], [_SB]
        valid[_SF], valid[_RF] = cross_after, cross_before
        valid[_SB], valid[_RB] = cross_before, cross_after
    else:  # compute waits for compute on other ranks, as with_communication would wire it
        wait[_F], wait[_B], wait[_I] = -1 * cross_before, cross_after, cross_after
        sender_f, sender_b = [_F], [_B, _I]
    link[sender_f], ctime[sender_f], produces[sender_f] = link_after, c_after, 0
    link[sender_b], ctime[sender_b], produces[sender_b] = link_before, c_before, 1
    if not valid.ravel()[kind_stage].all():
        raise PlanError("a send or receive has no peer stage; run validate(schedule) to see where")

    key = stage * m + mb
    cls = produces[kind_stage // S]
    made = np.flatnonzero(cls >= 0)
    maker = np.full(2 * S * m + 1, n, dtype=np.int64)  # the last slot answers "nobody"
    maker[cls[made] * (S * m) + key[made]] = made
    d = wait.ravel()[kind_stage]
    waits = d != 0
    dep = maker[np.where(waits, (d > 0) * (S * m) + key + d * m, 2 * S * m)]
    if (waits & (dep == n)).any():
        raise PlanError(
            "an action waits for data nobody sends; run validate(schedule) to see where"
        )
    return dep, link.ravel()[kind_stage], ctime.ravel()[kind_stage], waits


def _run(
    dep: Ints, link: Ints, ctime: Floats, dur: Floats, lens: Ints, p: int, schedule: Schedule
) -> tuple[Floats, Floats, Floats, Floats]:
    """The clock, in vectorised rounds: every rank whose next action is ready runs it.

    An action's ``arrival`` (when its output is usable by its consumer) is +inf until it has
    run, so one gather both tests readiness and gives the time.
    """
    n = len(dep)
    start, send_start = np.zeros(n), np.zeros(n)
    arrival = np.full(n + 1, np.inf)
    arrival[n] = 0.0  # the "no dependency" sentinel is always ready
    link_free = np.zeros(2 * p + 1)
    link_free[-1] = -np.inf  # the "no link" sentinel never delays
    clock = np.zeros(p)
    stop = np.cumsum(lens)
    ptr = stop - lens
    active = np.flatnonzero(lens > 0)
    while active.size:
        g = ptr[active]
        ready = arrival[dep[g]]
        ok = ready < np.inf
        if not ok.all():
            if not ok.any():
                stuck = ", ".join(f"rank {r} step {ptr[r] - stop[r] + lens[r]}" for r in active)
                raise PlanError(
                    f"schedule {schedule.name!r} deadlocks ({stuck} all wait); "
                    f"run validate(schedule) to see why"
                )
            active, g, ready = active[ok], g[ok], ready[ok]
        t0 = np.maximum(clock[active], ready)
        t1 = t0 + dur[g]
        lk = link[g]
        s0 = np.maximum(t1, link_free[lk])
        s1 = s0 + ctime[g]
        link_free[lk] = s1
        link_free[-1] = -np.inf
        start[g], send_start[g], arrival[g], clock[active] = t0, s0, s1, t1
        ptr[active] = g + 1
        active = np.flatnonzero(ptr < stop)
    return start, start + dur, send_start, arrival[:n]


def _peak(stage: Ints, kind: Ints, S: int) -> Ints:
    """Per stage, the running maximum of micro-batches held, in each stage's program order."""
    if len(stage) > 1 and (stage[1:] < stage[:-1]).any():
        order = np.argsort(stage, kind="stable")  # a stage's actions all sit on one rank
        stage, kind = stage[order], kind[order]
    running = np.cumsum(_HELD[kind])
    before = np.concatenate(([0], running))[np.searchsorted(stage, np.arange(S))]
    peak = np.zeros(S, dtype=np.int64)
    np.maximum.at(peak, stage, running - before[stage])
    return peak


@_bulk
def _timeline(trace: _Trace) -> list[TimelineEvent]:
    sched = trace.schedule
    start, end = trace.start.tolist(), trace.end.tolist()
    send_start, arrival = trace.send_start.tolist(), trace.arrival.tolist()
    waits, sends = trace.waits.tolist(), trace.sends.tolist()
    events: list[TimelineEvent] = []
    g = 0
    for r, row in enumerate(sched.actions):
        prev_end = 0.0
        for a in row:
            fwd = a.kind is Kind.F
            if trace.explicit:
                if a.kind in (Kind.SEND_F, Kind.SEND_B):
                    events.append((r, a, send_start[g], arrival[g]))
                elif a.kind in (Kind.RECV_F, Kind.RECV_B):  # the wait, from reaching it
                    events.append((r, a, prev_end, end[g]))
                else:
                    events.append((r, a, start[g], end[g]))
            else:
                if waits[g]:
                    recv = Action(a.stage, Kind.RECV_F if fwd else Kind.RECV_B, a.microbatch)
                    events.append((r, recv, prev_end, start[g]))
                events.append((r, a, start[g], end[g]))
                if sends[g]:
                    send = Action(a.stage, Kind.SEND_F if fwd else Kind.SEND_B, a.microbatch)
                    events.append((r, send, send_start[g], arrival[g]))
            prev_end = end[g]
            g += 1
    return events
