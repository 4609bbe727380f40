"""`run_pipeline`: spawned local ranks, or ``torchrun``'s, checked against one process."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import run_ranks

from partition.models import examples
from pipeline.launch.run import RunOptions, run_pipeline
from pipeline.launch.spawn import loopback_interface
from pipeline.runtime.pipeline import Pipeline, PipelineOptions


@pytest.mark.timeout(120)
def test_run_pipeline_spawns_ranks_and_checks_against_one_process() -> None:
    result = run_pipeline(
        "gpt",
        RunOptions(
            ranks=2,
            steps=2,
            check=True,
            size="toy",
            timeout=60,
            pipeline=PipelineOptions(schedule="1f1b", microbatches=4),
        ),
    )
    assert result is not None and result.ranks == 2 and len(result.steps) == 2
    assert all(s.loss is not None and s.time > 0 for s in result.steps)
    check = result.check
    assert check is not None and check.passed
    assert check.loss < 1e-5 and check.grads < 1e-5 and check.params < 1e-5, check
    # the timeline: the last step's actions of both ranks, on one clock (1F1B, 4 micro-batches)
    events = {(r, str(a)): (start, end) for r, a, start, end in result.timeline}
    assert len(events) == len(result.timeline)  # each action once: one step, not several
    for rank in (0, 1):
        mine = sorted((s, e, a) for (r, a), (s, e) in events.items() if r == rank)
        computed = sorted(a for _, _, a in mine if a[1] in "FB")
        assert computed == sorted(f"{rank}{k}{mb}" for k in "FB" for mb in range(4)), computed
        assert all(s <= e for s, e, _ in mine)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(mine))  # one at a time
        assert mine[-1][1] - mine[0][0] <= result.steps[-1].time  # within the step timed
    for mb in range(4):  # a receive ends after the send it waits for: the clocks agree
        assert events[(1, f"1RF{mb}")][1] >= events[(0, f"0F{mb}")][1]
        assert events[(0, f"0RB{mb}")][1] >= events[(1, f"1B{mb}")][1]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_run_pipeline_joins_torchrun(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            """
            import json
            from pipeline.launch.run import RunOptions, run_pipeline
            from pipeline.runtime import PipelineOptions

            options = RunOptions(
                ranks=2, size="toy", timeout=60,
                pipeline=PipelineOptions(schedule="gpipe", microbatches=2),
            )
            result = run_pipeline("gpt", options)
            if result:
                print("RESULT " + json.dumps(result.to_json()["steps"]))
            """
        )
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(script),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, done.stdout  # only rank 0 reports
    (step,) = json.loads(lines[0][len("RESULT ") :])
    assert step["loss"] > 0


def _my_sockets() -> dict[str, Any]:
    """After a step, the local addresses of this rank's TCP sockets (from ``/proc``)."""
    pipe = Pipeline(
        functools.partial(examples.gpt, "toy", batch=4), options=PipelineOptions(microbatches=2)
    )
    x = torch.randint(0, 96, (4, 16))
    pipe.step(x, x)
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    local = []
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    local.append(fields[1].split(":")[0])
    return {"local": local, "interface": os.environ.get("GLOO_SOCKET_IFNAME")}


_LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1 and ::1 in /proc's hex


@pytest.mark.skipif(not os.path.exists("/proc/self/net/tcp"), reason="reads Linux's /proc")
@pytest.mark.timeout(120)
def test_local_ranks_open_nothing_but_loopback() -> None:
    """Every TCP socket a local rank holds after a step is on loopback; gloo was bound to the
    loopback interface, not to the host name's address (here both are loopback, see
    [Note: local ranks stay off the network])."""
    for rank, got in enumerate(run_ranks(2, _my_sockets, timeout=90)):
        assert got["interface"] == loopback_interface() == "lo", (rank, got)
        assert got["local"], (rank, "no socket found: the check would prove nothing")
        assert set(got["local"]) <= _LOOPBACK, (rank, got["local"])
