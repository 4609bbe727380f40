"""The ``pipepart`` command: `main` parses, and each sub-command's module (`plan`, `run`, `export`,
`bench`) holds its flags; the flags they share are `common`'s."""

from __future__ import annotations

from pipeline.cli.main import main

__all__ = ["main"]
