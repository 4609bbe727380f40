"""ruff and mypy stay clean: the style and the types are checked on every change, like the tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True
    )


def test_ruff_check() -> None:
    out = _run("ruff", "check", ".")
    assert out.returncode == 0, out.stdout[-4000:]


def test_ruff_format() -> None:
    out = _run("ruff", "format", "--check", ".")
    assert out.returncode == 0, out.stdout[-4000:]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mypy() -> None:
    out = _run("mypy")  # the packages and options are in pyproject.toml
    assert out.returncode == 0, out.stdout[-4000:]
