"""Schedule names: the one table of names and aliases, and the default schedule."""

from __future__ import annotations

from partition.errors import PlanError

__all__ = ["DEFAULT_SCHEDULE", "SCHEDULE_NAMES", "canonical_schedule"]

SCHEDULE_NAMES: tuple[str, ...] = ("gpipe", "1f1b", "interleaved", "zb-h1")
"""Every schedule pipepart builds, by its canonical name."""
DEFAULT_SCHEDULE = "1f1b"
"""The schedule a plan, a pipeline and every command use when none is named."""
_ALIASES = {
    "one-f-one-b": "1f1b",
    "pipedream-flush": "1f1b",
    "interleaved-1f1b": "interleaved",
    "zbh1": "zb-h1",
    "zero-bubble": "zb-h1",
}


def canonical_schedule(name: str) -> str:
    """The canonical schedule name for ``name`` or its aliases; raises `PlanError` if unknown."""
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in SCHEDULE_NAMES:
        raise PlanError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    return key
