"""One job per checkpoint folder (issue 22, item 3; [Note: one job per folder] in
`pipeline.checkpoint.lock`): a second job is refused, naming the holder; a dead holder frees it;
a user's own script holds the folder from its first ``Pipeline.save``."""

from __future__ import annotations

import gc
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from harness import run_ranks
from torch import nn

from partition.errors import CheckpointError
from pipeline.checkpoint.lock import LOCK_NAME, FolderLock, hold_folder
from pipeline.checkpoint.store import latest_complete
from pipeline.cli import main
from pipeline.runtime.pipeline import Pipeline, PipelineOptions


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


def test_a_pipeline_holds_the_folder_while_it_lives_unless_this_process_holds_it(
    tmp_path: Path,
) -> None:
    """`hold_folder` (what ``Pipeline.save`` calls on rank 0): taken for the owner's lifetime;
    nothing taken when this process holds the folder already, or its launcher does for it."""

    class Owner:  # a pipeline, as far as the lock goes
        pass

    owner = Owner()
    hold_folder(owner, tmp_path / "a")
    hold_folder(owner, tmp_path / "a")  # the second save: held already, nothing to take
    with pytest.raises(CheckpointError, match=f"another job \\(host .*, pid {os.getpid()}\\)"):
        FolderLock(tmp_path / "a").__enter__()  # what another job would meet
    del owner
    gc.collect()
    with FolderLock(tmp_path / "a"):  # freed with its owner
        pass
    with FolderLock(tmp_path / "b"):  # under torchrun: rank 0's job holds it
        hold_folder(Owner(), tmp_path / "b")
    with FolderLock(tmp_path / "c", launcher_holds=True):  # a local rank: its launcher holds it
        hold_folder(Owner(), tmp_path / "c")
        assert not (tmp_path / "c" / LOCK_NAME).exists()  # nothing taken here


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 4) -> (B, 1)
        return self.layers(x)


def chain() -> Any:
    return Chain(), (torch.zeros(4, 4),), F.mse_loss


def _users_script(root: str) -> list[str]:
    """A user's own torchrun script: a `Pipeline`, saves; what another job meets meanwhile."""
    pipe = Pipeline(chain, options=PipelineOptions(microbatches=2))
    said = []
    for _ in range(2):  # the second save: this pipeline holds the folder already
        try:
            said.append(str(pipe.save(root)))
        except CheckpointError as e:
            said.append(f"refused: {e}")
    if dist.get_rank() == 0 and not said[0].startswith("refused"):
        try:
            FolderLock(root).__enter__()  # another job, as it would meet the folder
        except CheckpointError as e:
            said.append(f"other job: {e}")
        del pipe
        gc.collect()
        with FolderLock(root):  # released with the pipeline
            said.append("freed")
    return said


@pytest.mark.slow
def test_a_users_own_script_holds_the_folder_and_a_second_job_is_refused(
    tmp_path: Path,
) -> None:
    """Issue 22: ``Pipeline.save`` in a user's torchrun script took no lock."""
    first, second = tmp_path / "first", tmp_path / "second"
    said = run_ranks(2, _users_script, str(first), timeout=120)
    assert said[0][:2] == said[1] == [str(first / "step-00000000")] * 2
    assert said[0][2].startswith(f"other job: {first} is being written by another job (host")
    assert said[0][3] == "freed"
    with FolderLock(second):  # another job holds it: refused on every rank, by name
        refused = run_ranks(2, _users_script, str(second), timeout=120)
    for ranks in refused:
        assert ranks[0].startswith("refused: preparing the checkpoint failed on rank 0: ")
        assert (
            f"{second} is being written by another job (host {socket.gethostname()}, " in ranks[0]
        )
        assert f"pid {os.getpid()})" in ranks[0]
    assert sorted(p.name for p in second.iterdir()) == [LOCK_NAME]  # the other job's, untouched
