"""The ``pipepart`` command: `command` is its parser and entry point (`main`); each sub-command's
module (`plan`, `run`, `export`, `bench`) holds its flags, and the flags they share are `flags`'s."""

from __future__ import annotations

from pipeline.cli.command import main

__all__ = ["main"]
