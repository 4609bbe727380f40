"""The README's commands and training script keep working."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_setup_commands_install_torch_first_and_run_pytest() -> None:
    commands = [b.strip() for b in _blocks("bash") if "pip install torch==2.13.0" in b]
    assert len(commands) == 2
    for command in commands:
        assert command.index("pip install torch==2.13.0") < command.index("-e ")
    assert "pipepart plan gpt" in commands[0] and "pytest" in commands[1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert commands[1] in ci, ".ci/run must run exactly the README's test command"


@pytest.mark.timeout(300)
def test_training_script_runs_under_torchrun(tmp_path: Path) -> None:
    (script,) = [b for b in _blocks("python") if "init_process_group" in b]
    path = tmp_path / "train_gpt.py"
    path.write_text(script)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            str(path),
            "--pp",
            "2",
            "--steps",
            "11",
        ],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", out.stdout)]
    assert len(losses) == 2 and losses[1] < losses[0]
