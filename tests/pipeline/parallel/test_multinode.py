"""Multi-node, as users run it (issue 19): two ``torchrun --nnodes 2 --node-rank {0,1}
--nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT`` launches on this machine
form one job of pp=2 × dp=2 that trains as one launch of 4 ranks does, loss for loss, and whose
gradients match one process on the global batch (``--check``); and killing one node's agent
ends the other node's job with an error naming the lost ranks, within a minute, never a hang
(see [Note: a rank outlives no agent] in `pipeline.launch.torchrun`)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from partition.models.examples import gpt, lm_loss

RUN = ["-m", "pipeline.cli", "run"]
MESH = ["--ranks", "4", "--pp", "2", "--dp", "2", "--microbatches", "2", "--timeout", "30"]


def slow_gpt() -> Any:
    """The toy GPT, each loss a little slow (so that a run lasts), every rank writing its pid
    into ``PIPEPART_TEST_PIDS`` and the last stage's a file saying it trains."""
    folder = Path(os.environ["PIPEPART_TEST_PIDS"])
    (folder / f"pid-{os.environ.get('RANK', 'x')}-{os.getpid()}").touch()
    model, inputs, _ = gpt("toy", batch=8)

    def loss(output: Any, target: Any) -> Any:
        (folder / "training").touch()
        time.sleep(0.02)
        return lm_loss(output, target)

    return model, inputs, loss, inputs[0]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(tmp_path: Path) -> dict[str, str]:
    here, root = Path(__file__).parent, Path(__file__).parents[3]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), str(here)]),
        "PIPEPART_TEST_PIDS": str(tmp_path),
    }


def _node(rank: int, port: int, args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """One node's ``torchrun`` agent (in a process group of its own, to clean up after)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
    command += ["--node-rank", str(rank), "--nproc-per-node", "2", "--rdzv-backend", "c10d"]
    command += ["--rdzv-endpoint", f"127.0.0.1:{port}", *RUN, *args]
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


def _end(nodes: list[subprocess.Popen[str]], tmp_path: Path) -> None:
    """Kill what is left of the nodes and their ranks (by the pids they wrote)."""
    for node in nodes:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()
    for pid in _pids(tmp_path):
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _pids(tmp_path: Path) -> list[int]:
    return [int(p.name.rsplit("-", 1)[1]) for p in tmp_path.glob("pid-*")]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split(") ")[-1].startswith("Z"))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_nodes_train_as_one_launch_of_four_ranks(tmp_path: Path) -> None:
    args = ["gpt", *MESH, "--steps", "2", "--check", "--json"]
    env = _env(tmp_path)
    port = _port()
    nodes = [_node(rank, port, args, env) for rank in (0, 1)]
    try:
        outs = [node.communicate(timeout=300) for node in nodes]
    finally:
        _end(nodes, tmp_path)
    for node, (_, err) in zip(nodes, outs, strict=True):
        assert node.returncode == 0, err[-3000:]
    printed = [out.strip().splitlines()[-1] for out, _ in outs if out.strip()]
    assert len(printed) == 1, "global rank 0, on one of the nodes, reports the job"
    two_nodes = json.loads(printed[0])

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "4", *RUN, *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    one_launch = json.loads(done.stdout.strip().splitlines()[-1])

    assert two_nodes["ranks"] == 4 and two_nodes["stages"] == one_launch["stages"]
    assert two_nodes["stages"] == {"0": [0], "1": [1], "2": [0], "3": [1]}
    losses = [[s["loss"] for s in run["steps"]] for run in (two_nodes, one_launch)]
    assert losses[0] == losses[1] and None not in losses[0]  # bit for bit
    for run in (two_nodes, one_launch):  # every gradient, against one process
        assert run["check"]["passed"] and run["check"]["failures"] == [], run["check"]


def _listening(port: int, node: subprocess.Popen[str]) -> None:
    """Wait until ``node``'s agent hosts the rendezvous store on ``port``."""
    began = time.monotonic()
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert node.poll() is None and time.monotonic() - began < 60, "no rendezvous store"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("dies", ["worker node", "store host"])
def test_killing_one_nodes_agent_ends_the_other_with_an_error(tmp_path: Path, dies: str) -> None:
    """Node 0's agent hosts the rendezvous store (as on the machine of ``--rdzv-endpoint``).
    Node 1's agent killed: its ranks end themselves, node 0's lose them in the gradient
    all-reduce and fail naming them. Node 0's agent killed: the store goes with it and node 1's
    agent stops its ranks. Either way the survivor exits with an error within a minute, and no
    rank of the dead agent trains on."""
    args = ["test_multinode:slow_gpt", *MESH, "--steps", "100000"]
    port = _port()
    nodes = [_node(0, port, args, _env(tmp_path))]
    try:
        _listening(port, nodes[0])
        nodes.append(_node(1, port, args, _env(tmp_path)))
        began = time.monotonic()
        while not (tmp_path / "training").exists():
            assert time.monotonic() - began < 180, "the job did not start training"
            assert all(node.poll() is None for node in nodes), "a node ended before training"
            time.sleep(0.2)
        time.sleep(1.0)
        dead, survivor = (nodes[1], nodes[0]) if dies == "worker node" else (nodes[0], nodes[1])
        os.kill(dead.pid, signal.SIGKILL)  # the agent only: its ranks are orphaned
        killed = time.monotonic()
        _, err = survivor.communicate(timeout=60)  # a hang fails here
        assert time.monotonic() - killed < 60
        assert survivor.returncode != 0, err[-3000:]
        if dies == "worker node":  # the survivor's ranks fail, saying where and whom they lost
            assert "pipepart run: error: [rank" in err, err[-3000:]
            named = "PeerError: lost a replica while" in err  # the gradients' or the losses' sum
            assert named or "by peer" in err, err[-3000:]  # (else the mesh's non-finite check)
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in _pids(tmp_path)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [pid for pid in _pids(tmp_path) if _alive(pid)] == [], "a rank trained on"
    finally:
        _end(nodes, tmp_path)
