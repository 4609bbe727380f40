"""A stopped run leaves nothing running: SIGTERM stops every rank as Ctrl-C does, and ranks whose
launcher was killed outright end by themselves (issue 22, item 1; [Note: no orphan ranks] in
`pipeline.launch.spawn`).

Each test starts ``pipepart run`` in a session of its own, so every process the run starts (the
launcher, the fork server, the ranks) is found by its session id, whatever its parent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

RUN = ["-m", "pipeline.cli", "run", "gpt", "--size", "toy", "--ranks", "2"]
RUN += ["--microbatches", "2", "--steps", "1000000", "--timeout", "60"]


def _session(sid: int) -> list[int]:
    """Every live process of session ``sid`` (zombies are dead already)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, session = fields[0], int(fields[3])
        if session == sid and state != "Z":
            found.append(int(entry.name))
    return found


def _start() -> subprocess.Popen[str]:
    launcher = subprocess.Popen(
        [sys.executable, *RUN],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 120
    while len(_session(launcher.pid)) < 4:  # the launcher, the fork server, two ranks
        assert launcher.poll() is None, launcher.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the ranks did not start"
        time.sleep(0.2)
    time.sleep(1.0)  # the ranks are training
    return launcher


def _gone(sid: int, within: float) -> list[int]:
    deadline = time.monotonic() + within
    while _session(sid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _session(sid)


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_sigterm_stops_every_rank_and_says_terminated() -> None:
    launcher = _start()
    sid = launcher.pid
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "pipepart run: terminated" in err
    assert _gone(sid, within=10.0) == []


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_ranks_end_by_themselves_when_the_launcher_is_killed() -> None:
    launcher = _start()
    sid = launcher.pid
    launcher.kill()  # SIGKILL: the launcher can clean nothing up
    launcher.communicate(timeout=30)
    assert _gone(sid, within=15.0) == []
