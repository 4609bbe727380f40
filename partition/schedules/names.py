"""Schedule names: the one table of names and aliases, the default schedule, and schedules a
user writes (their text stands where a name would).

[Note: a schedule a user writes] ``--schedule @FILE`` reads a file in the per-rank text form
`Schedule.to_text` prints (one line per rank, actions such as ``0F1`` separated by spaces).
Wherever a schedule name flows (options, the planner, a plan's ``schedule`` field, the
runtime), the file's *text* flows instead, so a plan made from a file is self-contained: it
needs the file no more. `partition.schedules.custom` parses and validates it, against the
run's ranks and micro-batches. Its placement is looping (stage s on rank ``s % ranks``, with
``stages / ranks`` per rank) unless a line ``# placement: v`` declares the V shape (2 stages per
rank, rank r holding stages r and ``2 ranks - 1 - r``; see [Note: placement] in
`partition.schedules.placement`); that line is the one comment kept in the canonical text.
"""

from __future__ import annotations

import re
from pathlib import Path

from partition.errors import PlanError
from partition.schedules.placement import placement_header, read_placement

__all__ = [
    "CUSTOM_SCHEDULE",
    "DEFAULT_SCHEDULE",
    "SCHEDULE_NAMES",
    "V_SCHEDULES",
    "canonical_schedule",
    "is_custom",
    "placement_of",
    "schedule_label",
    "stages_per_rank",
]

SCHEDULE_NAMES: tuple[str, ...] = ("gpipe", "1f1b", "interleaved", "zb-h1", "zb-v", "dualpipev")
"""Every schedule pipepart builds, by its canonical name."""
V_SCHEDULES: tuple[str, ...] = ("zb-v", "dualpipev")
"""The built-in schedules with the V placement: 2 stages per rank, rank r holding r and 2p-1-r."""
DEFAULT_SCHEDULE = "1f1b"
"""The schedule a plan, a pipeline and every command use when none is named."""
CUSTOM_SCHEDULE = "custom"
"""The `Schedule.name` of a schedule a user writes; see [Note: a schedule a user writes]."""
_ACTION = re.compile(r"\d+[A-Z]+\d+")
_ALIASES = {
    "one-f-one-b": "1f1b",
    "pipedream-flush": "1f1b",
    "interleaved-1f1b": "interleaved",
    "zbh1": "zb-h1",
    "zero-bubble": "zb-h1",
    "zbv": "zb-v",
    "zero-bubble-v": "zb-v",
    "dualpipe-v": "dualpipev",
}


def is_custom(schedule: str) -> bool:
    """Whether ``schedule`` (canonical) is a schedule's text rather than a built-in name."""
    return schedule not in SCHEDULE_NAMES


def schedule_label(schedule: str) -> str:
    """``schedule`` for a message or a title: the name, or ``custom (R ranks)`` for a text."""
    if not is_custom(schedule):
        return schedule
    return f"{CUSTOM_SCHEDULE} ({len(read_placement(schedule)[1].splitlines())} ranks)"


def placement_of(schedule: str) -> str:
    """The placement ``schedule`` (a name or a schedule's text) implies: ``v`` for the V
    schedules and a text that declares it, else ``loop``; see [Note: placement]."""
    key = canonical_schedule(schedule)
    if is_custom(key):
        return read_placement(key)[0]
    return "v" if key in V_SCHEDULES else "loop"


def stages_per_rank(schedule: str, virtual: int = 1) -> int:
    """The stages per rank a built-in ``schedule`` runs when asked for ``virtual``: 2 for a V
    schedule (``virtual`` 1, the default, or 2), ``virtual`` for ``interleaved`` (at least 2),
    1 for the others; a schedule's text: ``virtual`` (the text decides, see
    `partition.schedules.custom.custom_virtual`).

    Raises:
        PlanError: a count the schedule cannot place, saying what to pass instead.
    """
    key = canonical_schedule(schedule)
    if is_custom(key):
        return virtual
    if key in V_SCHEDULES:
        if virtual not in (1, 2):
            raise PlanError(
                f"schedule {key!r} is V-shaped: exactly 2 stages per rank (rank r holds stages r "
                f"and 2p-1-r), got virtual={virtual}; leave --virtual out or pass 2"
            )
        return 2
    if key == "interleaved" and virtual < 2:
        raise PlanError(
            f"the interleaved schedule needs virtual >= 2 stages per device, got {virtual}; pass "
            "--virtual 2 or more, or use the '1f1b' schedule"
        )
    if key != "interleaved" and virtual != 1:
        raise PlanError(
            f"schedule {key!r} with {virtual} stage(s) per device: virtual={virtual} needs the "
            f"interleaved schedule, not {key!r} (or, with 2, a V schedule: "
            f"{', '.join(V_SCHEDULES)}); use schedule='interleaved' or virtual=1"
        )
    return virtual


def canonical_schedule(name: str) -> str:
    """The canonical schedule for ``name``: a built-in name (aliases accepted), or, for
    ``@FILE`` or a schedule's text, that text with one line per rank and single spaces.

    Raises:
        PlanError: an unknown name, an unreadable file, or one with no actions.
    """
    stripped = name.strip()
    key = stripped.lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key in SCHEDULE_NAMES:
        return key
    if stripped.startswith("@"):
        return _normalise(_read(stripped[1:]), stripped[1:])
    if _ACTION.search(stripped):  # an action such as 0F0: a schedule's text
        return _normalise(name, "the schedule text")
    raise PlanError(
        f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}, "
        "or @FILE for a schedule file"
    )


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise PlanError(
            f"cannot read the schedule file {path!r}: {getattr(e, 'strerror', None) or e}; give @FILE with a "
            "readable text file, one line of actions (such as 0F0 0B0) per rank"
        ) from e


def _normalise(text: str, source: str) -> str:
    """One line per rank, single spaces, no comments but a ``# placement: v`` line first;
    `partition.schedules.custom` parses it."""
    placement, text = read_placement(text)
    lines = [" ".join(line.split("#")[0].split()) for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise PlanError(f"{source} holds no actions; write one line of actions per rank")
    return placement_header(placement) + "\n".join(lines)
