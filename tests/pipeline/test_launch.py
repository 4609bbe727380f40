"""`run_pipeline`: spawned local ranks, or ``torchrun``'s, checked against one process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.launch import run_pipeline


@pytest.mark.timeout(120)
def test_run_pipeline_spawns_ranks_and_checks_against_one_process() -> None:
    result = run_pipeline(
        "gpt", ranks=2, schedule="1f1b", microbatches=4, steps=2, check=True, size="toy", timeout=60
    )
    assert result["ranks"] == 2 and len(result["steps"]) == 2
    assert all(s["loss"] is not None and s["time"] > 0 for s in result["steps"])
    check = result["check"]
    assert check["loss"] < 1e-5 and check["grads"] < 1e-5 and check["params"] < 1e-5, check
    ranks = {r for r, *_ in result["timeline"]}
    assert ranks == {0, 1} and min(start for _, _, start, _ in result["timeline"]) == 0.0


@pytest.mark.timeout(120)
def test_run_pipeline_joins_torchrun(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            """
            import json
            from pipeline.launch import run_pipeline

            result = run_pipeline("gpt", ranks=2, schedule="gpipe", microbatches=2, steps=1, size="toy", timeout=60)
            if result:
                print("RESULT " + json.dumps(result["steps"]))
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
