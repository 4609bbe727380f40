"""Placement: which rank holds which stage, the one rule every stage → rank mapping follows.

[Note: placement]
Two placements exist. ``loop`` (GPipe, 1F1B, interleaved, ZB-H1) puts stage ``s`` on rank
``s % p``: with ``v`` stages per rank, rank r holds ``r, r + p, r + 2p, ...``. ``v`` (ZB-V,
DualPipeV; Qi et al. 2024, section 6) folds the pipeline back: with 2 stages per rank, rank r
holds stages ``r`` and ``2p - 1 - r``, so the first and the last stage share rank 0 and the
middle pair, ``p - 1`` and ``p``, shares rank ``p - 1``::

    stage  0  1  2  3 | 4  5  6  7        (p = 4 ranks, 8 stages)
    loop   0  1  2  3 | 0  1  2  3
    v      0  1  2  3 | 3  2  1  0

Under ``v`` every neighbour is one rank away and the middle cut needs no message at all: the
tensor is handed over in memory (`partition.schedules.actions.with_communication` emits no
send or receive between stages of one rank, and the runtime's executor passes the tensor on).
A schedule carries its placement (`Schedule.placement`); a name implies it
(`partition.schedules.names.placement_of`), and a schedule file declares ``v`` in a
``# placement: v`` line (see [Note: a schedule a user writes]). The planner (`Problem.stage_device`),
the plan (`Plan.stage_rank`), the simulator and the runtime all map stages through here.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

from partition.errors import PlanError

__all__ = [
    "PLACEMENTS",
    "Placement",
    "check_placement",
    "placement_header",
    "rank_stages",
    "read_placement",
    "stage_rank",
]

Placement = Literal["loop", "v"]
"""``loop``: stage s on rank ``s % p``; ``v``: rank r holds stages r and ``2p - 1 - r``."""
PLACEMENTS: tuple[str, ...] = get_args(Placement)


def check_placement(placement: str, num_ranks: int, num_stages: int) -> None:
    """Raise `PlanError` unless ``num_stages`` stages can be placed on ``num_ranks`` this way.

    Raises:
        PlanError: an unknown placement, a stage count that is not a multiple of the ranks, or
            ``v`` with other than 2 stages per rank.
    """
    if placement not in PLACEMENTS:
        raise PlanError(f"unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")
    if placement == "v" and num_stages != 2 * num_ranks:
        raise PlanError(
            f"the V placement puts 2 stages on each rank, but {num_stages} stages are on "
            f"{num_ranks} ranks; use {2 * num_ranks} stages (virtual=2)"
        )


def stage_rank(stage: int, num_ranks: int, placement: str = "loop") -> int:
    """The rank that holds ``stage``; see [Note: placement]."""
    if placement == "v" and stage >= num_ranks:
        return 2 * num_ranks - 1 - stage
    return stage % num_ranks


def rank_stages(
    rank: int, num_ranks: int, num_stages: int, placement: str = "loop"
) -> tuple[int, ...]:
    """The stages ``rank`` holds, in increasing order; see [Note: placement]."""
    if placement == "v":
        return (rank, 2 * num_ranks - 1 - rank)
    return tuple(range(rank, num_stages, num_ranks))


_HEADER = re.compile(r"#\s*placement\s*:\s*(\S*)\s*", re.IGNORECASE)


def placement_header(placement: str) -> str:
    """The line a schedule's text starts with to declare ``placement`` (none for ``loop``)."""
    return "" if placement == "loop" else f"# placement: {placement}\n"


def read_placement(text: str) -> tuple[str, str]:
    """The placement a schedule's text declares in a ``# placement: NAME`` line (default
    ``loop``), and the text without that line.

    Raises:
        PlanError: an unknown placement, or two lines that declare different ones.
    """
    found: set[str] = set()
    kept = []
    for line in text.split("\n"):
        match = _HEADER.fullmatch(line.strip())
        if match is None:
            kept.append(line)
            continue
        name = match[1].lower()
        if name not in PLACEMENTS:
            raise PlanError(
                f"the schedule declares placement {match[1]!r}; write '# placement: v' (rank r "
                "holds stages r and 2p-1-r) or leave the line out (stage s on rank s % p)"
            )
        found.add(name)
    if len(found) > 1:
        raise PlanError(f"the schedule declares two placements, {sorted(found)}; keep one line")
    return (found.pop() if found else "loop"), "\n".join(kept)
