"""One job per checkpoint folder (issue 22, item 3; [Note: one job per folder] in
`pipeline.checkpoint.lock`): a second job is refused, naming the holder; a dead holder frees it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from partition.errors import CheckpointError
from pipeline.checkpoint.lock import LOCK_NAME, FolderLock
from pipeline.checkpoint.store import latest_complete
from pipeline.cli import main


def test_a_second_holder_is_refused_by_name_and_the_first_release_frees_it(
    tmp_path: Path,
) -> None:
    with FolderLock(tmp_path / "ckpt"):
        with pytest.raises(CheckpointError) as refused:
            FolderLock(tmp_path / "ckpt").__enter__()
        assert f"host {socket.gethostname()}, pid {os.getpid()}" in str(refused.value)
        assert "is being written by another job" in str(refused.value)
    with FolderLock(tmp_path / "ckpt"):  # released: taken again
        pass
    assert latest_complete(tmp_path / "ckpt") == (None, [])  # the lock file is no checkpoint


def test_a_holder_that_dies_frees_the_folder(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pipeline.checkpoint.lock import FolderLock\n"
            f"with FolderLock({str(tmp_path)!r}):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    with pytest.raises(CheckpointError, match=f"pid {holder.pid}"):
        FolderLock(tmp_path).__enter__()
    holder.send_signal(signal.SIGKILL)  # a crash: no clean-up runs
    holder.wait()
    deadline = time.monotonic() + 5
    while True:
        try:
            with FolderLock(tmp_path):
                break
        except CheckpointError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert (tmp_path / LOCK_NAME).exists()


def test_run_refuses_a_folder_another_job_writes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The second job is refused before it starts a rank; the first job's checkpoints stay."""
    ckpt = tmp_path / "ckpt"
    with FolderLock(ckpt):
        code = main(["run", "gpt", "--size", "toy", "--ranks", "2", "--checkpoint-dir", str(ckpt)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{ckpt} is being written by another job (host {socket.gethostname()}" in err
    assert sorted(p.name for p in ckpt.iterdir()) == [LOCK_NAME]  # nothing written, no step-N
