"""Pipeline schedules as plain data, per-rank lists of actions such as ``1F0`` and ``2SB3``: the
builders of the looping ones (GPipe, 1F1B, interleaved, ZB-H1) and `build_schedule`, by name.

A schedule says, for every rank, the order in which it runs forward (F), backward (B), or the
zero-bubble halves of backward (I: input-gradient, W: weight-gradient) for each stage and
micro-batch, and, once :func:`with_communication` has been applied, where it sends and receives
boundary tensors. The runtime and the simulator consume the same objects
(`partition.schedules.schedule`; this module re-exports them);
`partition.schedules.check.validate` checks one with no process at all.

1F1B (PipeDream-flush), 4 ranks, 8 micro-batches, F and B one slot each; the digit is the
micro-batch, ``.`` is idle (the bubble)::

    rank 0 | F0 F1 F2 F3 .  .  .  B0 F4 B1 F5 B2 F6 B3 F7 B4 .  B5 .  B6 .  B7
    rank 1 | .  F0 F1 F2 .  .  B0 F3 B1 F4 B2 F5 B3 F6 B4 F7 B5 .  B6 .  B7 .
    rank 2 | .  .  F0 F1 .  B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 .  B7 .  .
    rank 3 | .  .  .  F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7 .  .  .

Rank r warms up with ``p - r - 1`` forwards, then alternates one forward and one backward,
then drains the remaining backwards. [Note: 1F1B memory] Stage s therefore never holds more
than ``min(p - s, m)`` micro-batches of activations, where GPipe holds all ``m``.
"""

from __future__ import annotations

from partition.errors import PlanError
from partition.schedules.communication import with_communication
from partition.schedules.names import SCHEDULE_NAMES, canonical_schedule, is_custom, stages_per_rank
from partition.schedules.schedule import Action, Kind, Schedule, _bulk, _check_sizes
from partition.schedules.vshape import build_v

__all__ = [
    "SCHEDULES",
    "Action",
    "Kind",
    "Schedule",
    "build_schedule",
    "gpipe",
    "interleaved_1f1b",
    "one_f_one_b",
    "peak_inflight",
    "with_communication",
    "zero_bubble_h1",
]

SCHEDULES: tuple[str, ...] = SCHEDULE_NAMES
"""The schedules by name (the one table, with its aliases, is `partition.memory`'s)."""


# --- builders --------------------------------------------------------------------------------


@_bulk
def gpipe(num_ranks: int, m: int) -> Schedule:
    """GPipe: every rank runs all forwards, then all backwards. Holds all ``m`` micro-batches."""
    _check_sizes("gpipe", num_ranks, m)
    rows = [
        [Action(r, Kind.F, i) for i in range(m)] + [Action(r, Kind.B, i) for i in range(m)]
        for r in range(num_ranks)
    ]
    return Schedule("gpipe", num_ranks, num_ranks, m, tuple(map(tuple, rows)))


@_bulk
def one_f_one_b(num_ranks: int, m: int) -> Schedule:
    """1F1B (PipeDream-flush); see [Note: 1F1B memory]. Any ``m >= 1`` (``m < p`` is all bubble)."""
    _check_sizes("1f1b", num_ranks, m)
    rows = []
    for r in range(num_ranks):
        warm = min(num_ranks - r - 1, m)
        row = [Action(r, Kind.F, i) for i in range(warm)]
        for i in range(m - warm):
            row += (Action(r, Kind.F, warm + i), Action(r, Kind.B, i))
        row += [Action(r, Kind.B, i) for i in range(m - warm, m)]
        rows.append(tuple(row))
    return Schedule("1f1b", num_ranks, num_ranks, m, tuple(rows))


@_bulk
def interleaved_1f1b(num_ranks: int, m: int, virtual: int) -> Schedule:
    """Megatron's interleaved 1F1B: ``virtual`` stages per rank, stage s on rank ``s % p``.

    Micro-batches go through in groups of ``p``: a rank runs chunk 0 for micro-batches 0..p-1,
    then chunk 1 for the same group, and so on; backwards visit the chunks in reverse. The
    warm-up on rank r is ``2 (p - r - 1) + (v - 1) p`` virtual forwards. Like Megatron, it needs
    ``m`` to be a multiple of ``p`` (so ``m >= p``). ``virtual == 1`` is plain :func:`one_f_one_b`.

    Raises:
        PlanError: ``m`` is not a positive multiple of ``num_ranks``, or ``virtual < 1``.
    """
    _check_sizes("interleaved", num_ranks, m)
    if virtual < 1:
        raise PlanError(f"interleaved schedule needs virtual >= 1 stages per rank, got {virtual}")
    if virtual == 1:
        return one_f_one_b(num_ranks, m)
    p, v = num_ranks, virtual
    if m % p:
        near = " or ".join(str(n) for n in sorted({max(p, m - m % p), m - m % p + p}))
        raise PlanError(
            f"interleaved schedule needs the number of micro-batches to be a multiple of the "
            f"number of ranks (Megatron's rule): got {m} micro-batches on {p} ranks; use "
            f"{near} micro-batches, or the '1f1b' schedule"
        )
    total = m * v

    def chunk_mb(k: int, forward: bool) -> tuple[int, int]:
        chunk = (k // p) % v
        return (chunk if forward else v - 1 - chunk), (k // (p * v)) * p + k % p

    rows = []
    for r in range(p):
        warm = min(2 * (p - r - 1) + (v - 1) * p, total)
        order = [(k, True) for k in range(warm)]
        for k in range(total - warm):
            order += [(warm + k, True), (k, False)]
        order += [(k, False) for k in range(total - warm, total)]
        row = []
        for k, fwd in order:
            chunk, mb = chunk_mb(k, fwd)
            row.append(Action(chunk * p + r, Kind.F if fwd else Kind.B, mb))
        rows.append(tuple(row))
    return Schedule("interleaved", p, p * v, m, tuple(rows))


@_bulk
def zero_bubble_h1(num_ranks: int, m: int) -> Schedule:
    """ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism"): B split into I and W.

    At slot x = 0 .. m + p - 2, rank r runs ``F x``, then ``I (x - (p-1-r))``, then
    ``W (x - (p-1))``, skipping indices outside 0..m-1. I (on the critical path) keeps 1F1B's
    spacing; W is deferred by up to ``r`` slots into the bubbles. Any ``m >= 1``.

    [Note: ZB-H1 memory] Counting a micro-batch as held until its W, every stage holds at most
    ``min(p, m)``: the same peak as 1F1B's worst stage (stage 0), which is the paper's claim;
    stages s > 0 hold more than under 1F1B (``p - s``), though after I they keep only what W
    needs.
    """
    _check_sizes("zb-h1", num_ranks, m)
    p = num_ranks
    rows = []
    for r in range(p):
        row = []
        for x in range(m + p - 1):
            if x < m:
                row.append(Action(r, Kind.F, x))
            if 0 <= x - (p - 1 - r) < m:
                row.append(Action(r, Kind.I, x - (p - 1 - r)))
            if 0 <= x - (p - 1) < m:
                row.append(Action(r, Kind.W, x - (p - 1)))
        rows.append(tuple(row))
    return Schedule("zb-h1", p, p, m, tuple(rows))


def build_schedule(name: str, num_ranks: int, num_microbatches: int, virtual: int = 1) -> Schedule:
    """Build a schedule by name: one of :data:`SCHEDULES` (aliases accepted); the V-shaped ones
    (`partition.schedules.vshape`) have 2 stages per rank whether ``virtual`` is 1 or 2.
    `partition.schedules.custom.schedule_for` builds these and the ones a user writes.

    Raises:
        PlanError: unknown name, bad sizes, or ``virtual`` the schedule cannot place.
    """
    key = canonical_schedule(name)
    if is_custom(key):  # see [Note: a schedule a user writes]
        raise PlanError(
            "a schedule you write is built by partition.schedules.custom.schedule_for, which "
            "validates it; build_schedule builds the named ones"
        )
    if key == "interleaved":
        return interleaved_1f1b(num_ranks, num_microbatches, virtual)
    if stages_per_rank(key, virtual) == 2:  # V-shaped
        return build_v(key, num_ranks, num_microbatches)
    builder = {"gpipe": gpipe, "1f1b": one_f_one_b, "zb-h1": zero_bubble_h1}[key]
    return builder(num_ranks, num_microbatches)


def peak_inflight(schedule: Schedule) -> list[int]:
    """Per stage, the most micro-batches forwarded but not yet fully backward-ed (B, or W).

    This bounds activation memory: 1F1B gives ``min(p - s, m)`` on stage s, GPipe ``m``,
    ZB-H1 ``min(p, m)`` on every stage (see [Note: ZB-H1 memory]).
    """
    held = [0] * schedule.num_stages
    peak = [0] * schedule.num_stages
    for row in schedule.actions:
        for a in row:
            if a.kind is Kind.F:
                held[a.stage] += 1
                peak[a.stage] = max(peak[a.stage], held[a.stage])
            elif a.kind in (Kind.B, Kind.W):
                held[a.stage] -= 1
    return peak
