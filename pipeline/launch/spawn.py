"""Local ranks: spawn one process per rank, each in a new process group, and never hang.

[Note: spawned ranks]
`spawn_ranks` starts one process per rank, each with ``torch.set_num_threads(1)`` (CPU) and a
process group joined through a file rendezvous in a fresh temporary directory: gloo on CPU, NCCL
when every rank can have its own GPU. With the ``forkserver`` start method (what `run_pipeline`
uses) torch is imported once, by the server, and every rank is forked from it in milliseconds;
``spawn`` imports it again in every rank. Each rank sends its outcome (a value, or the
exception's types, message and traceback) through its own pipe. The parent waits on the pipes and
on the processes themselves, so a rank killed by a signal is seen at once; with
``kill_on_failure`` the first failure kills every other rank, and a rank still running at
``timeout`` is asked for its Python stacks (SIGUSR1, faulthandler) and killed: the call never
hangs. Ranks destroy their process group on the way out (giving up after 10 s if peers are gone).

[Note: no orphan ranks]
A rank must not outlive its run: a launcher stopped by Ctrl-C or SIGTERM (``timeout``, Slurm,
``docker stop``) kills every rank it started before it exits (`spawn_ranks` does on any
exception, and the ``pipepart`` command turns SIGTERM into one), and a launcher killed outright
(SIGKILL) cannot, so each rank watches the launcher's process and ends itself within half a
second of losing it. (Not its parent: under ``forkserver`` that is the fork server, which lives
as long as any process holding its pipe — the ranks themselves.)

[Note: local ranks stay off the network]
The rendezvous is a file in a temporary directory only this user can read (``mkdtemp``'s 0700).
Gloo binds each rank's connections to the address the host name resolves to, which on many
machines is the LAN's: so unless the user chose an interface (``GLOO_SOCKET_IFNAME``), a local
rank binds gloo to the loopback interface, and nothing it opens is reachable from another machine.
NCCL's own bootstrap sockets follow ``NCCL_SOCKET_IFNAME``, which is left to the user.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import faulthandler
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import signal
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from partition.errors import InputError
from pipeline.runtime.device import default_backend

__all__ = ["RankOutcome", "SpawnOptions", "loopback_interface", "spawn_ranks"]

log = logging.getLogger(__name__)

# What a fork server imports once for all the ranks it starts. torch._dynamo is imported when
# parameters are initialised on meta, and takes seconds on its own.
_PRELOAD = (
    "torch",
    "torch._dynamo",
    "pipeline.launch.run",
    "pipeline.launch.spawn",
    "partition.planning.model",
)


def loopback_interface() -> str | None:
    """The loopback network interface's name (``lo`` on Linux, ``lo0`` on BSD and macOS)."""
    names = {name for _, name in socket.if_nameindex()}
    return next((n for n in ("lo", "lo0") if n in names), None)


@dataclass
class RankOutcome:
    """How one spawned rank ended."""

    rank: int
    ok: bool
    value: Any = None
    """What the rank's function returned (when ``ok``)."""
    error_types: tuple[str, ...] = ()
    """Names of the exception's classes, most derived first (``StageValueError``, ``StageError``...)."""
    message: str = ""
    traceback: str = ""
    exitcode: int | None = None
    elapsed: float = 0.0
    """Seconds from the start of all ranks until this one reported or exited."""
    killed: str = ""
    """Why the parent killed it (``"peer failed"``, ``"timeout"``), if it did."""

    def describe(self) -> str:
        if self.ok:
            return f"rank {self.rank}: ok in {self.elapsed:.1f} s"
        kind = self.error_types[0] if self.error_types else f"exit code {self.exitcode}"
        extra = f" (killed: {self.killed})" if self.killed else ""
        return f"rank {self.rank}: {kind} after {self.elapsed:.1f} s{extra}: {self.message}"


@dataclass
class _Child:
    rank: int
    process: mp.process.BaseProcess
    conn: multiprocessing.connection.Connection
    child_conn: multiprocessing.connection.Connection
    """Kept open until the end: a spawned child receives its end when it starts up."""
    outcome: RankOutcome | None = None


@dataclass(frozen=True, kw_only=True)
class SpawnOptions:
    """How `spawn_ranks` starts and watches its ranks."""

    timeout: float = 600.0
    """Seconds for the whole run; ranks still running then are killed."""
    pg_timeout: float = 300.0
    """The process group's timeout (how long a collective or receive may wait)."""
    backend: str | None = None
    """``gloo`` or ``nccl``; default `pipeline.runtime.device.default_backend` for the ranks."""
    kill_on_failure: bool = True
    """Kill every rank as soon as one fails (else let them end on their own, which is what
    failure-handling tests observe)."""
    log_level: int = logging.WARNING
    start_method: str = "spawn"
    """``spawn`` (a fresh interpreter per rank), or ``forkserver``, which imports ``preload``
    once in a server process and forks every rank from it: much faster when ranks are started
    many times (tests), since importing torch takes seconds."""
    preload: tuple[str, ...] = ()


def spawn_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    options: SpawnOptions | None = None,
    **knobs: Any,
) -> list[RankOutcome]:
    """Run ``fn(*args)`` on ``world_size`` new processes, each a rank of a new process group.

    See [Note: spawned ranks]. ``fn`` and ``args`` must be picklable (a module-level function).
    ``options`` (or ``knobs``, its fields one by one: ``timeout=60``) say how; see
    `SpawnOptions`.

    Returns:
        One `RankOutcome` per rank, in rank order.
    """
    options = dataclasses.replace(options or SpawnOptions(), **knobs)
    if world_size < 1:
        raise InputError(f"need at least 1 rank, got {world_size}")
    backend = options.backend or default_backend(world_size)
    start_method = options.start_method
    ctx: Any = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload([*_PRELOAD, *options.preload])
    with tempfile.TemporaryDirectory(prefix="pipepart-") as tmp:
        init = Path(tmp) / "rendezvous"
        children = []
        for rank in range(world_size):
            parent_conn, child_conn = ctx.Pipe(duplex=False)
            process = ctx.Process(
                target=_rank_main,
                args=(
                    fn,
                    tuple(args),
                    _RankStart(rank, world_size, str(init), backend, options),
                    child_conn,
                ),
                name=f"pipepart-rank-{rank}",
                daemon=True,
            )
            children.append(_Child(rank, process, parent_conn, child_conn))
        start = time.monotonic()
        try:
            for child in children:
                child.process.start()
            _supervise(children, start, options.timeout, options.kill_on_failure)
        except BaseException:  # Ctrl-C, SIGTERM (see pipeline.cli.command), a bug: none outlives us
            _kill(
                {c.rank: c for c in children if c.process.pid is not None}, "launcher ended", start
            )
            raise
    outcomes = [c.outcome for c in children]
    assert all(o is not None for o in outcomes)
    return outcomes  # type: ignore[return-value]


def _supervise(children: list[_Child], start: float, timeout: float, kill_on_failure: bool) -> None:
    deadline = start + timeout
    live = {c.rank: c for c in children}
    while live:
        waitables: list[Any] = []
        for c in live.values():
            waitables += [c.conn, c.process.sentinel]
        ready = multiprocessing.connection.wait(
            waitables, timeout=max(0.0, deadline - time.monotonic())
        )
        now = time.monotonic() - start
        for c in list(live.values()):
            if c.outcome is None and (
                c.conn in ready or (c.process.sentinel in ready and c.conn.poll())
            ):
                try:
                    c.outcome = pickle.loads(c.conn.recv_bytes())
                    c.outcome.elapsed = now
                except (EOFError, OSError):
                    pass
            if c.process.sentinel in ready or (c.outcome is not None and not c.process.is_alive()):
                c.process.join()
                if c.outcome is None:
                    c.outcome = RankOutcome(
                        c.rank,
                        False,
                        exitcode=c.process.exitcode,
                        elapsed=now,
                        message=f"the process died with exit code {c.process.exitcode} without reporting",
                    )
                c.outcome.exitcode = c.process.exitcode
                del live[c.rank]
        failed = any(c.outcome is not None and not c.outcome.ok for c in children)
        if failed and kill_on_failure:
            _kill(live, "peer failed", start)
        if live and time.monotonic() >= deadline:
            _kill(live, "timeout", start)


def _kill(live: dict[int, _Child], why: str, start: float) -> None:
    if why == "timeout":  # ask for Python stacks first (faulthandler, on the ranks' stderr)
        for c in live.values():
            if c.process.pid is not None:
                with contextlib.suppress(OSError):
                    os.kill(c.process.pid, signal.SIGUSR1)
        time.sleep(0.5)
    for c in live.values():
        c.process.kill()
    for c in list(live.values()):
        c.process.join()
        if c.outcome is None:  # a rank that reported (and was ending) was not cut short
            c.outcome = RankOutcome(
                c.rank, False, exitcode=c.process.exitcode, elapsed=time.monotonic() - start
            )
            c.outcome.message = f"killed by the launcher ({why})"
            c.outcome.killed = why
        c.outcome.exitcode = c.process.exitcode
    live.clear()


def _end_with_launcher(launcher: int, poll: float = 0.5) -> None:
    """End this rank when the launcher (process ``launcher``) is gone; see [Note: no orphan
    ranks]."""

    def alive() -> bool:
        try:
            os.kill(launcher, 0)
        except (ProcessLookupError, PermissionError):  # gone, or the pid is someone else's now
            return False
        try:  # a killed launcher nobody has reaped yet is a zombie: gone too
            return Path(f"/proc/{launcher}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return True

    def watch() -> None:
        while alive():
            time.sleep(poll)
        os._exit(1)  # nobody is left to report to

    threading.Thread(target=watch, name="pipepart-parent-watch", daemon=True).start()


@dataclass(frozen=True)
class _RankStart:
    """Who a spawned rank is and how it joins its process group."""

    rank: int
    world_size: int
    init: str
    """The rendezvous file."""
    backend: str
    options: SpawnOptions
    launcher: int = dataclasses.field(default_factory=os.getpid)
    """The process that spawned the rank (made in it, so its pid)."""


def _rank_main(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    start: _RankStart,
    conn: multiprocessing.connection.Connection,
) -> None:
    """The body of one spawned rank; see [Note: spawned ranks]."""
    rank, backend = start.rank, start.backend
    logging.basicConfig(
        level=start.options.log_level,
        format=f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s",
    )
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    _end_with_launcher(start.launcher)
    torch.set_num_threads(1)
    outcome: RankOutcome
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        loopback = loopback_interface()
        if loopback is not None:  # see [Note: local ranks stay off the network]
            os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
        dist.init_process_group(
            backend,
            init_method=f"file://{start.init}",
            rank=rank,
            world_size=start.world_size,
            timeout=datetime.timedelta(seconds=start.options.pg_timeout),
        )
        outcome = RankOutcome(rank, True, value=fn(*args))
    except BaseException as e:
        outcome = RankOutcome(
            rank,
            False,
            error_types=tuple(c.__name__ for c in type(e).__mro__),
            message=str(e),
            traceback=traceback.format_exc(),
        )
    # Plain pickle copies tensors into the message (multiprocessing's own pickler would share
    # them through file descriptors that die with this process).
    try:
        conn.send_bytes(pickle.dumps(outcome))
    except Exception as e:  # an unpicklable value: this rank failed after all
        outcome = RankOutcome(
            rank, False, error_types=(type(e).__name__,), message=f"cannot send the result: {e}"
        )
        conn.send_bytes(pickle.dumps(outcome))
    conn.close()
    if dist.is_initialized():
        # Peers may be gone: if tearing the group down blocks on them, exit anyway.
        watchdog = threading.Timer(10.0, os._exit, args=(0 if outcome.ok else 1,))
        watchdog.daemon = True
        watchdog.start()
        dist.destroy_process_group()
        watchdog.cancel()
    if not outcome.ok:
        logging.shutdown()
        os._exit(1)
