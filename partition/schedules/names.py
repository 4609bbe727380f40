"""Schedule names: the one table of names and aliases, the default schedule, and schedules a
user writes (their text stands where a name would).

[Note: a schedule a user writes] ``--schedule @FILE`` reads a file in the per-rank text form
`Schedule.to_text` prints (one line per rank, actions such as ``0F1`` separated by spaces).
Wherever a schedule name flows (options, the planner, a plan's ``schedule`` field, the
runtime), the file's *text* flows instead, so a plan made from a file is self-contained: it
needs the file no more. `partition.schedules.custom` parses and validates it, against the
run's ranks and micro-batches; placement stays looping, with ``stages / ranks`` per rank.
"""

from __future__ import annotations

import re
from pathlib import Path

from partition.errors import PlanError

__all__ = [
    "CUSTOM_SCHEDULE",
    "DEFAULT_SCHEDULE",
    "SCHEDULE_NAMES",
    "canonical_schedule",
    "is_custom",
    "schedule_label",
]

SCHEDULE_NAMES: tuple[str, ...] = ("gpipe", "1f1b", "interleaved", "zb-h1")
"""Every schedule pipepart builds, by its canonical name."""
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
}


def is_custom(schedule: str) -> bool:
    """Whether ``schedule`` (canonical) is a schedule's text rather than a built-in name."""
    return schedule not in SCHEDULE_NAMES


def schedule_label(schedule: str) -> str:
    """``schedule`` for a message or a title: the name, or ``custom (R ranks)`` for a text."""
    if not is_custom(schedule):
        return schedule
    return f"{CUSTOM_SCHEDULE} ({len(schedule.splitlines())} ranks)"


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
    """One line per rank, single spaces, no comments; `partition.schedules.custom` parses it."""
    lines = [" ".join(line.split("#")[0].split()) for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise PlanError(f"{source} holds no actions; write one line of actions per rank")
    return "\n".join(lines)
