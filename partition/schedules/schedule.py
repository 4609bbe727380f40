"""The data a schedule is: `Action` (``1F0``: stage 1 runs F on micro-batch 0), its `Kind`, and
`Schedule`, what every rank runs in order, with its placement and its text form.

The builders (`partition.schedules.actions`, `partition.schedules.vshape`) make them; the
checks, the simulator and the runtime read them.
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
from partition.schedules import placement as _place

__all__ = ["Action", "Kind", "Schedule"]


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

    Stage s lives on rank ``stage_to_rank(s)``: ``s % num_ranks`` (``loop``), or V-shaped
    (``v``: rank r holds r and ``2p - 1 - r``); see [Note: placement] in
    `partition.schedules.placement`.
    """

    name: str
    num_ranks: int
    num_stages: int
    num_microbatches: int
    actions: tuple[tuple[Action, ...], ...]
    placement: _place.Placement = "loop"

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
        _place.check_placement(self.placement, self.num_ranks, self.num_stages)

    def stage_to_rank(self, stage: int) -> int:
        """The rank that holds ``stage``."""
        return _place.stage_rank(stage, self.num_ranks, self.placement)

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """The stages held by ``rank``, in increasing order."""
        return _place.rank_stages(rank, self.num_ranks, self.num_stages, self.placement)

    def to_text(self) -> str:
        """One line per rank, actions separated by spaces, after a ``# placement: v`` line for
        a V-shaped one; :meth:`from_text` inverts it."""
        rows = "\n".join(" ".join(map(str, row)) for row in self.actions)
        return _place.placement_header(self.placement) + rows

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
        placement, text = _place.read_placement(text)
        lines = text[:-1].split("\n") if text.endswith("\n") else text.split("\n")
        rows = tuple(tuple(Action.parse(tok) for tok in line.split()) for line in lines)
        flat = [a for row in rows for a in row]
        return cls(
            name=name,
            num_ranks=len(rows),
            num_stages=num_stages or 1 + max((a.stage for a in flat), default=0),
            num_microbatches=num_microbatches or 1 + max((a.microbatch for a in flat), default=0),
            actions=rows,
            placement=placement,  # type: ignore[arg-type]
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
