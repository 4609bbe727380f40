"""The one multi-process test harness: spawn gloo ranks, collect what each returned, never hang.

``run_ranks(world_size, fn, *args, timeout=...)`` runs ``fn(*args)`` on ``world_size`` spawned
processes joined in a gloo process group (file rendezvous in a temporary directory, one thread
per rank), through `pipeline.launch.spawn.spawn_ranks`. By default the first failure kills every rank,
the test fails with every rank's traceback, and a rank still running at ``timeout`` is killed
after dumping its Python stacks (so a hang is a failure with a stack, not a stuck CI job).
``expect_failure=True`` instead lets ranks end on their own and returns every `RankOutcome`, for
the tests that inject failures and check how each rank ended.

Functions run on ranks must be importable: define them at module level in the test module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest

from pipeline.launch.spawn import RankOutcome, spawn_ranks

__all__ = ["RankOutcome", "run_ranks"]

# Imported once by the fork server beside pipeline.launch.spawn's own list.
_PRELOAD = ("pytest", "harness")


def run_ranks(
    world_size: int,
    fn: Callable[..., Any],
    *args: Any,
    timeout: float = 120.0,
    pg_timeout: float = 30.0,
    expect_failure: bool = False,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` gloo ranks.

    Returns:
        Each rank's return value (rank order); with ``expect_failure``, each rank's `RankOutcome`.
    """
    outcomes = spawn_ranks(
        fn,
        world_size,
        args,
        timeout=timeout,
        pg_timeout=pg_timeout,
        backend="gloo",
        kill_on_failure=not expect_failure,
        log_level=logging.WARNING,
        start_method="forkserver",
        preload=_PRELOAD,
    )
    hung = [o for o in outcomes if o.killed == "timeout"]
    if hung:
        pytest.fail(
            f"ranks did not finish within {timeout} s (stacks on stderr):\n{_report(outcomes)}"
        )
    if expect_failure:
        return outcomes
    if not all(o.ok for o in outcomes):
        pytest.fail(f"a rank failed:\n{_report(outcomes)}")
    return [o.value for o in outcomes]


def _report(outcomes: list[RankOutcome]) -> str:
    lines = [o.describe() for o in outcomes]
    for o in outcomes:
        if o.traceback:
            lines.append(f"--- rank {o.rank} traceback ---\n{o.traceback}")
    return "\n".join(lines)
