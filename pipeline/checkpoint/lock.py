"""One job per checkpoint folder: a lock the writing job holds while it runs.

[Note: one job per folder]
Two jobs saving into one folder overwrite each other's ``step-N`` with checkpoints that pass
their checksums: each job reports success and one has lost everything. So the job that writes a
folder holds an exclusive ``fcntl`` lock on ``ROOT/.lock`` for as long as it runs — the launcher
of local ranks, or rank 0 under torchrun — and writes its host and pid into the file; a second
job is refused before it trains, naming the holder. The kernel drops the lock when the holder's
process ends, however it ends, so a crashed job never leaves the folder locked.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from partition.errors import CheckpointError

__all__ = ["LOCK_NAME", "FolderLock"]

LOCK_NAME = ".lock"


class FolderLock:
    """``with FolderLock(root):`` — hold ``root`` for this job; see [Note: one job per folder].

    Raises:
        CheckpointError: another live job holds the folder (its host and pid are named).
    """

    def __init__(self, root: str | Path) -> None:
        self.path = Path(root) / LOCK_NAME
        self._file: IO[str] | None = None

    def __enter__(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
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
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _describe(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"host {holder['host']}, pid {holder['pid']}"
    except (ValueError, KeyError, TypeError):
        return "its host and pid unknown"
