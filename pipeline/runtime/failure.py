"""Where a rank failed: ``[rank 2 · stage 2 · step 14 · 2B5]``, and the error that says so.

[Note: failing loudly]
Every action runs under a handler that re-raises any exception with its place,
``[rank 2 · stage 2 · step 14 · 2B5]``, as an exception that is both a `StageError` and the
original type, chained to the original (`locate`). Work after the schedule (summing gradients,
the optimizer step, the sends still in flight) is placed by what it was instead of an action:
``[rank 0 · step 3 · optimizer]``. A rank whose peer fails sees its next send or receive on
that peer fail at once (gloo closes the connection when a process exits) and raises a
`pipeline.runtime.comm.PeerError` naming the peer; a peer that hangs is caught by the process
group's timeout. Checks of the batch run before any message, identically on every rank given
the batch (`pipeline.runtime.batch`).
"""

from __future__ import annotations

import logging
from typing import Any

from partition.errors import StageError, stage_error
from partition.schedules.actions import Action

__all__ = ["RankLog", "locate", "place"]

log = logging.getLogger(__name__)


def place(rank: int, step: int, action: Action | None = None, what: str = "") -> str:
    """``"rank 2 · stage 2 · step 14 · 2B5"``, or ``"rank 0 · step 3 · optimizer"`` for work
    that is not an action (``what``)."""
    where = [f"rank {rank}"]
    if action is not None:
        where.append(f"stage {action.stage}")
    where.append(f"step {step}")
    where.append(str(action) if action is not None else what)
    return " · ".join(where)


def locate(
    error: Exception, rank: int, step: int, action: Action | None = None, what: str = ""
) -> Exception:
    """``error`` with its place in front, as a `StageError` that is also a ``type(error)`` (to
    raise ``from error``); see [Note: failing loudly]. An error already placed (a `StageError`)
    is returned as it is, so that the innermost place wins.
    """
    if isinstance(error, StageError):
        return error
    message = f"[{place(rank, step, action, what)}] {type(error).__name__}: {error}"
    log.error("%s", message)  # already says which rank
    return stage_error(error, message)


class RankLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every message with ``[rank r]``."""

    def __init__(self, logger: logging.Logger, rank: int) -> None:
        super().__init__(logger, {})
        self.rank = rank

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[rank {self.rank}] {msg}", kwargs
