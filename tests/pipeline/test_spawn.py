"""Local ranks (`pipeline.launch.spawn.spawn_ranks`) on their own: values in rank order whatever
order the ranks finish in, a raising rank reported with its error types and traceback, a rank
that dies without a word, a value that cannot be sent, ``kill_on_failure``, the timeout, and
the knobs that override `SpawnOptions`. How pipeline failures end every rank is
`tests/pipeline/test_failures.py`; these functions do nothing but what each test needs.

Functions run on the ranks are at module level (the ranks import this module). Calls use the
fork server with `tests/harness.py`'s preload, so they share the one it starts.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist

from partition.errors import InputError
from pipeline.launch.spawn import RankOutcome, SpawnOptions, spawn_ranks


def _spawn(fn: Callable[..., Any], world: int, *args: Any, **knobs: Any) -> list[RankOutcome]:
    options = SpawnOptions(
        timeout=60, backend="gloo", start_method="forkserver", preload=("pytest", "harness")
    )
    return spawn_ranks(fn, world, args, options, **knobs)


class NoSuchKey(KeyError):
    """An error of the test's own, to see its class and every base reported."""


# --- on the ranks -------------------------------------------------------------------------------


def _who(delays: tuple[float, ...]) -> dict[str, Any]:
    rank = dist.get_rank()
    time.sleep(delays[rank])
    return {
        "rank": rank,
        "world": dist.get_world_size(),
        "backend": dist.get_backend(),
        "pid": os.getpid(),
        "threads": torch.get_num_threads(),
        "tensor": torch.arange(100_000) * rank,
    }


def _fail_on(failing: int, sleep: float) -> str:
    if dist.get_rank() == failing:
        raise NoSuchKey("no such key")
    time.sleep(sleep)
    return "done"


def _sleep_unless(rank: int, seconds: float) -> str:
    if dist.get_rank() != rank:
        time.sleep(seconds)
    return "done"


def _exit_without_a_word(code: int) -> None:
    os._exit(code)


def _unpicklable() -> Any:
    return lambda: None


class _SlowFlush(logging.Handler):
    """A log handler whose flush takes a second: it holds a failed rank in its way out
    (``logging.shutdown()``) after it has reported."""

    def emit(self, record: logging.LogRecord) -> None:
        pass

    def flush(self) -> None:
        time.sleep(1.0)


def _fail_slowly() -> None:
    logging.getLogger().addHandler(_SlowFlush())
    raise NoSuchKey("first")


def _log_level() -> int:
    return logging.getLogger().level


def _barrier_unless(rank: int, seconds: float) -> str:
    """Every rank but ``rank`` waits in a barrier that ``rank`` joins only after ``seconds``."""
    if dist.get_rank() == rank:
        time.sleep(seconds)
    dist.barrier()
    return "done"


# --- values -------------------------------------------------------------------------------------


def test_values_come_back_in_rank_order_whatever_order_ranks_end_in() -> None:
    outcomes = _spawn(_who, 3, (0.6, 0.3, 0.0))  # rank 2 ends first, rank 0 last
    assert [o.rank for o in outcomes] == [0, 1, 2]
    assert all(o.ok and o.exitcode == 0 and not o.killed and not o.error_types for o in outcomes)
    values = [o.value for o in outcomes]
    assert [v["rank"] for v in values] == [0, 1, 2]
    assert {(v["world"], v["backend"], v["threads"]) for v in values} == {(3, "gloo", 1)}
    pids = {v["pid"] for v in values}
    assert len(pids) == 3 and os.getpid() not in pids  # one new process per rank
    for rank, v in enumerate(values):  # a tensor outlives the process that made it
        assert torch.equal(v["tensor"], torch.arange(100_000) * rank)
    assert outcomes[0].elapsed > outcomes[2].elapsed  # reported when each ended
    assert outcomes[0].describe().startswith("rank 0: ok in ")


# --- failures -----------------------------------------------------------------------------------


def test_a_raising_rank_reports_its_error_types_message_and_traceback() -> None:
    outcomes = _spawn(_fail_on, 2, 1, 1.0, kill_on_failure=False)
    failed, other = outcomes[1], outcomes[0]
    assert not failed.ok and failed.value is None
    assert failed.error_types == (
        "NoSuchKey",
        "KeyError",
        "LookupError",
        "Exception",
        "BaseException",
        "object",
    )
    assert failed.message == "'no such key'"  # str() of a KeyError
    assert "in _fail_on" in failed.traceback
    assert 'raise NoSuchKey("no such key")' in failed.traceback
    assert failed.traceback.rstrip().endswith("NoSuchKey: 'no such key'")
    assert failed.exitcode == 1 and not failed.killed
    assert failed.describe().startswith("rank 1: NoSuchKey after ")
    assert failed.describe().endswith(": 'no such key'")
    # without kill_on_failure the other rank, still sleeping, ends on its own
    assert other.ok and other.value == "done" and not other.killed
    assert other.elapsed >= 1.0


def test_kill_on_failure_kills_the_other_ranks_at_once() -> None:
    began = time.monotonic()
    outcomes = _spawn(_fail_on, 3, 0, 60.0)  # kill_on_failure is the default
    assert time.monotonic() - began < 20  # not the 60 s the others would sleep
    assert outcomes[0].error_types[0] == "NoSuchKey"
    for o in outcomes[1:]:
        assert not o.ok and o.killed == "peer failed", o.describe()
        assert o.exitcode == -signal.SIGKILL
        assert o.message == "killed by the launcher (peer failed)"
        assert o.describe().endswith("(killed: peer failed): killed by the launcher (peer failed)")


def test_the_rank_that_failed_is_not_reported_killed_for_a_peer() -> None:
    """It was: kill_on_failure killed every live rank, the failed one too while it was on its
    way out, and labelled it killed by a peer (exit -9); describe() then blamed a peer."""
    (outcome,) = _spawn(_fail_slowly, 1)  # no peer at all
    assert outcome.error_types[0] == "NoSuchKey"
    assert outcome.killed == "", outcome.describe()


def test_a_rank_that_dies_without_reporting_is_reported_by_its_exit_code() -> None:
    (outcome,) = _spawn(_exit_without_a_word, 1, 3)
    assert not outcome.ok and outcome.exitcode == 3 and outcome.error_types == ()
    assert outcome.message == "the process died with exit code 3 without reporting"
    assert outcome.describe().startswith("rank 0: exit code 3 after ")


def test_a_value_that_cannot_be_sent_is_a_failure() -> None:
    (outcome,) = _spawn(_unpicklable, 1, kill_on_failure=False)
    assert not outcome.ok and outcome.value is None and len(outcome.error_types) == 1
    assert outcome.message.startswith("cannot send the result: ")


def test_a_value_that_cannot_be_sent_exits_non_zero() -> None:
    """It was: the rank reported a failure but exited 0 (the status came from the outcome
    before the send failed)."""
    (outcome,) = _spawn(_unpicklable, 1, kill_on_failure=False)
    assert not outcome.ok
    assert outcome.exitcode not in (0, None), outcome.describe()


# --- the timeout --------------------------------------------------------------------------------


def test_the_timeout_kills_the_ranks_still_running_and_says_so() -> None:
    began = time.monotonic()
    outcomes = _spawn(_sleep_unless, 3, 0, 60.0, timeout=1.5)
    took = time.monotonic() - began
    assert 1.5 <= took < 10
    assert outcomes[0].ok and outcomes[0].value == "done"  # it ended in time
    for o in outcomes[1:]:
        assert not o.ok and o.killed == "timeout", o.describe()
        assert o.message == "killed by the launcher (timeout)"
        assert o.exitcode == -signal.SIGKILL  # SIGUSR1 dumped the stacks, it did not kill
        assert o.elapsed >= 1.5


# --- options and knobs --------------------------------------------------------------------------


def test_knobs_override_the_options() -> None:
    began = time.monotonic()
    (slow,) = spawn_ranks(
        _sleep_unless,
        1,
        (1, 60.0),
        SpawnOptions(timeout=600, backend="gloo", start_method="forkserver"),
        timeout=1.0,
    )
    assert slow.killed == "timeout" and time.monotonic() - began < 10
    (default,) = _spawn(_log_level, 1)
    (debug,) = _spawn(_log_level, 1, log_level=logging.DEBUG)
    assert (default.value, debug.value) == (logging.WARNING, logging.DEBUG)


def test_pg_timeout_is_the_process_group_s() -> None:
    """Rank 1 joins the barrier after 20 s: under a 1 s process-group timeout rank 0 gives up
    (and rank 1 is killed), long before the run's own timeout."""
    began = time.monotonic()
    outcomes = _spawn(_barrier_unless, 2, 1, 20.0, pg_timeout=1.0)
    assert time.monotonic() - began < 10
    assert not outcomes[0].ok and "Timed out" in outcomes[0].message, outcomes[0].describe()
    assert 1.0 <= outcomes[0].elapsed < 10
    assert outcomes[1].killed == "peer failed"


def test_bad_arguments_are_refused_before_any_process_starts() -> None:
    with pytest.raises(InputError, match="need at least 1 rank, got 0"):
        spawn_ranks(_log_level, 0)
    with pytest.raises(TypeError, match="no_such_knob"):
        spawn_ranks(_log_level, 1, no_such_knob=1)
