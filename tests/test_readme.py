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
    assert "-c constraints.txt -c constraints-dev.txt" in commands[1]


def test_the_test_command_pins_every_tool_it_installs() -> None:
    """Every package of the dev, hf and zoo extras has an exact pin, so a new release of one can
    not change the test suite's outcome by itself (bump it in constraints-dev.txt instead)."""
    tomllib = pytest.importorskip("tomllib")
    root = README.parent
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    pins = {}
    for name in ("constraints.txt", "constraints-dev.txt"):
        for line in (root / name).read_text().splitlines():
            if "==" in line and not line.lstrip().startswith("#"):
                package, _, version = line.partition("==")
                pins[_canonical(package)] = version.strip()
    wanted = {
        _canonical(re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0])
        for e in ("dev", "hf", "zoo")
        for r in extras[e]
    }
    assert sorted(wanted - set(pins)) == []
    for package in ("ruff", "mypy", "pytest", "hypothesis", "transformers"):
        assert re.fullmatch(r"\d+(\.\d+)+", pins[package]), (package, pins[package])


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


@pytest.mark.slow
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
            "--standalone",  # a free port, not the default 29500 another torchrun may hold
            "--nproc-per-node",
            "4",  # 2 replicas of a 2-rank pipeline
            str(path),
            "--pp",
            "2",
            "--steps",
            "11",
            "--accumulate",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", out.stdout)]
    assert len(losses) == 2 and losses[1] < losses[0]
