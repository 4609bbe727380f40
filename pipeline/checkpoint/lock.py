"""One job per checkpoint folder: a lock the writing job holds while it runs.

[Note: one job per folder]
Two jobs saving into one folder overwrite each other's ``step-N`` with checkpoints that pass
their checksums: each job reports success and one has lost everything. So the job that writes a
folder holds an exclusive ``fcntl`` lock on ``ROOT/.lock`` for as long as it runs — the launcher
of local ranks, or rank 0 under torchrun — and writes its host and pid into the file; a second
job is refused before it trains, naming the holder. The kernel drops the lock when the holder's
process ends, however it ends, so a crashed job never leaves the folder locked.

A user's own script (under torchrun) holds it too: the first ``Pipeline.save(root)`` takes it on
the pipeline's rank 0, held until that pipeline is collected or the process ends (`hold_folder`).
`hold_folder` takes nothing when this process holds the folder already, by its resolved path:
through a `FolderLock` it entered (rank 0 under ``pipepart run`` in torchrun), or one its job's
launcher holds for it (``FolderLock(root, launcher_holds=True)``: a local rank, whose launcher
took the lock before it started the ranks, so that a ``flock`` of the rank's own would be
refused). Two `FolderLock`s entered on one folder refuse each other, in one process as in two.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import IO

from partition.errors import CheckpointError

__all__ = ["LOCK_NAME", "FolderLock", "hold_folder"]

LOCK_NAME = ".lock"

_HELD: weakref.WeakValueDictionary[str, FolderLock] = weakref.WeakValueDictionary()
"""The folders this process holds, or whose lock its launcher holds for it, by resolved path."""


class FolderLock:
    """``with FolderLock(root):`` — hold ``root`` for this job; see [Note: one job per folder].

    Raises:
        CheckpointError: another live job holds the folder (its host and pid are named).
    """

    def __init__(self, root: str | Path, *, launcher_holds: bool = False) -> None:
        """``launcher_holds``: this process's launcher holds the lock for it (a local rank):
        recognised as held, nothing taken."""
        self.path = Path(root) / LOCK_NAME
        self.launcher_holds = launcher_holds
        self._key = str(Path(root).resolve())
        self._file: IO[str] | None = None
        self.taken = False
        """Whether this holder holds the folder now (entered, not yet left)."""

    def __enter__(self) -> FolderLock:
        if not self.launcher_holds:
            self._lock()
        _HELD[self._key] = self
        self.taken = True
        return self

    def _lock(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 (held open while the job runs)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _describe(handle.read())
            handle.close()
            raise CheckpointError(
                f"{self.path.parent} is being written by another job ({holder}); use another "
                "folder (--checkpoint-dir), or wait for that job to end"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(
            json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()})
        )
        handle.flush()
        self._file = handle

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self.taken and _HELD.get(self._key) is self:
            del _HELD[self._key]
        self.taken = False
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def hold_folder(owner: object, root: str | Path) -> None:
    """Hold ``root`` for as long as ``owner`` (a pipeline) lives, unless this process holds it
    already; see [Note: one job per folder].

    Raises:
        CheckpointError: another live job holds the folder (its host and pid are named).
    """
    if str(Path(root).resolve()) in _HELD:
        return
    lock = FolderLock(root).__enter__()
    weakref.finalize(owner, lock.__exit__, None, None, None)


def _describe(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"host {holder['host']}, pid {holder['pid']}"
    except (ValueError, KeyError, TypeError):
        return "its host and pid unknown"
