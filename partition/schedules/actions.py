"""Pipeline schedules as plain data: per-rank lists of actions such as ``1F0`` and ``2SB3``.

A schedule says, for every rank, the order in which it runs forward (F), backward (B), or the
zero-bubble halves of backward (I: input-gradient, W: weight-gradient) for each stage and
micro-batch, and, once :func:`with_communication` has been applied, where it sends and receives
boundary tensors. The runtime and the simulator consume the same objects;
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

import dataclasses
import enum
import functools
import gc
import re
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from partition.errors import PlanError
from partition.schedules.names import SCHEDULE_NAMES, canonical_schedule, is_custom

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


class Kind(str, enum.Enum):
    """What an action does; the value is its code in the text form."""

    F = "F"  # forward
    B = "B"  # full backward
    I = "I"  # noqa: E741 - backward, input-gradient only (zero-bubble)
    W = "W"  # backward, weight-gradient only (zero-bubble)
    SEND_F = "SF"  # stage s sends its forward output to stage s + 1
    RECV_F = "RF"  # stage s receives its input from stage s - 1
    SEND_B = "SB"  # stage s sends its input-gradient to stage s - 1
    RECV_B = "RB"  # stage s receives its output-gradient from stage s + 1


_COMPUTE = frozenset({Kind.F, Kind.B, Kind.I, Kind.W})
_ACTION_RE = re.compile(r"(\d+)(SF|RF|SB|RB|F|B|I|W)(\d+)")


@dataclasses.dataclass(frozen=True, slots=True)
class Action:
    """One step of one rank: ``stage`` runs ``kind`` on ``microbatch``; prints as ``1F0``."""

    stage: int
    kind: Kind
    microbatch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind.value}{self.microbatch}"

    @classmethod
    def parse(cls, text: str) -> Action:
        """Parse the compact form, e.g. ``"1F0"`` or ``"2SB3"``.

        Raises:
            PlanError: ``text`` is not ``<stage><code><microbatch>``.
        """
        match = _ACTION_RE.fullmatch(text.strip())
        if match is None:
            codes = ", ".join(k.value for k in Kind)
            raise PlanError(
                f"cannot parse action {text!r}: expected <stage><code><micro-batch> such as "
                f"'1F0' or '2SB3', with code one of {codes}"
            )
        return cls(int(match[1]), Kind(match[2]), int(match[3]))


@dataclasses.dataclass(frozen=True)
class Schedule:
    """What every rank runs, in order: ``actions[rank]`` is that rank's list.

    Stage s lives on rank ``s % num_ranks`` (looping placement; with one stage per rank,
    stage s is rank s).
    """

    name: str
    num_ranks: int
    num_stages: int
    num_microbatches: int
    actions: tuple[tuple[Action, ...], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "actions", tuple(tuple(row) for row in self.actions))
        if min(self.num_ranks, self.num_stages, self.num_microbatches) < 1:
            raise PlanError(
                f"schedule {self.name!r} has {self.num_ranks} ranks, {self.num_stages} stages "
                f"and {self.num_microbatches} micro-batches; each must be at least 1"
            )
        if len(self.actions) != self.num_ranks:
            raise PlanError(
                f"schedule {self.name!r} declares {self.num_ranks} ranks but has "
                f"{len(self.actions)} action lists; give one list per rank"
            )

    def stage_to_rank(self, stage: int) -> int:
        """The rank that holds ``stage``."""
        return stage % self.num_ranks

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """The stages held by ``rank``, in increasing order."""
        return tuple(range(rank, self.num_stages, self.num_ranks))

    def to_text(self) -> str:
        """One line per rank, actions separated by spaces; :meth:`from_text` inverts it."""
        return "\n".join(" ".join(map(str, row)) for row in self.actions)

    @classmethod
    def from_text(
        cls,
        text: str,
        *,
        name: str = "custom",
        num_microbatches: int | None = None,
        num_stages: int | None = None,
    ) -> Schedule:
        """Parse :meth:`to_text` output; stage and micro-batch counts default to the largest seen + 1."""
        lines = text[:-1].split("\n") if text.endswith("\n") else text.split("\n")
        rows = tuple(tuple(Action.parse(tok) for tok in line.split()) for line in lines)
        flat = [a for row in rows for a in row]
        return cls(
            name=name,
            num_ranks=len(rows),
            num_stages=num_stages or 1 + max((a.stage for a in flat), default=0),
            num_microbatches=num_microbatches or 1 + max((a.microbatch for a in flat), default=0),
            actions=rows,
        )

    def table(self, *, mark: tuple[int, int] | None = None, steps: range | None = None) -> str:
        """A step × rank ASCII table: row k holds each rank's k-th action.

        Args:
            mark: ``(rank, step)`` of a cell to flag with ``>``.
            steps: the rows to show (default all).
        """
        depth = max(map(len, self.actions), default=0)
        shown = [k for k in (steps if steps is not None else range(depth)) if 0 <= k < depth]
        grid = [[f"rank {r}" for r in range(self.num_ranks)]] + [
            [
                (">" if mark == (r, k) else " ") + str(row[k] if k < len(row) else "")
                for r, row in enumerate(self.actions)
            ]
            for k in shown
        ]
        widths = [max(len(line[r]) for line in grid) for r in range(self.num_ranks)]
        lines = [
            f"{label:>4} | " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True))
            for label, line in zip(["step", *shown], grid, strict=True)
        ]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(line.rstrip() for line in lines)


# --- builders --------------------------------------------------------------------------------

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _bulk(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``fn`` with the cyclic garbage collector paused; see [Note: building large schedules].

    [Note: building large schedules] 1,024 stages × 4,096 micro-batches are 8.4 M ``Action``
    objects, none in a cycle; CPython's collector re-scanning the growing heap made building
    ~40 % slower. The collector's previous state is restored on exit.
    """

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()

    return wrapper


def _check_sizes(name: str, num_ranks: int, m: int) -> None:
    if num_ranks < 1 or m < 1:
        raise PlanError(
            f"{name} schedule needs at least 1 rank and 1 micro-batch, got {num_ranks} ranks and "
            f"{m} micro-batches; pass positive numbers"
        )


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
    """Build a schedule by name: one of :data:`SCHEDULES` (also ``pipedream-flush``, ``zbh1``);
    `partition.schedules.custom.schedule_for` builds these and the ones a user writes.

    Raises:
        PlanError: unknown name, bad sizes, or ``virtual > 1`` for a one-stage-per-rank schedule.
    """
    key = canonical_schedule(name)
    if is_custom(key):  # see [Note: a schedule a user writes]
        raise PlanError(
            "a schedule you write is built by partition.schedules.custom.schedule_for, which "
            "validates it; build_schedule builds the named ones"
        )
    if key == "interleaved":
        return interleaved_1f1b(num_ranks, num_microbatches, virtual)
    if virtual != 1:
        raise PlanError(
            f"schedule {key!r} places one stage per rank, got virtual={virtual}; use "
            f"virtual=1 or the 'interleaved' schedule"
        )
    builder = {"gpipe": gpipe, "1f1b": one_f_one_b, "zb-h1": zero_bubble_h1}[key]
    return builder(num_ranks, num_microbatches)


# --- communication ---------------------------------------------------------------------------


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
