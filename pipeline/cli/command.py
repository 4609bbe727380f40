"""The ``pipepart`` command's entry point: the parser of every sub-command, and its errors.

Every sub-command prints a table for people and, with ``--json``, one JSON object on stdout for
scripts. Errors are one line on stderr and exit code 2; ``--debug``, before or after the
sub-command, prints the traceback above that line (see [Note: --debug anywhere] in `flags`).
Each sub-command lives in the module that names it — `pipeline.cli.plan` (``plan``, ``show``,
``simulate``), `pipeline.cli.run`, `pipeline.cli.export`, `pipeline.cli.bench`,
`pipeline.cli.calibrate` — with the flags it reads; the flags they share, and the options those
make, are `pipeline.cli.flags`'s.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import traceback
from collections.abc import Sequence

import pipeline.cli.bench as bench_command
import pipeline.cli.calibrate as calibrate_command
import pipeline.cli.export as export_command
import pipeline.cli.plan as plan_command
import pipeline.cli.run as run_command
from partition.errors import FactoryError, PipepartError
from pipeline.cli.flags import add_debug_argument

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipepart",
        description="Split a PyTorch model into pipeline stages, predict it, and train it across ranks.",
    )
    add_debug_argument(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (plan_command, run_command, export_command, bench_command, calibrate_command):
        command.register(sub)
    return parser


def _one_line(message: str) -> str:
    """An error as one line: the failed rank's line of a multi-rank report, else every line of
    the message joined (its later lines are often the ways out: "fx hit...", "Ways out: ...")."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return "failed"
    for line in lines:
        if line.startswith("rank ") and "killed by the launcher" not in line:
            return line
    if any(line.startswith("rank ") for line in lines):  # every rank killed: the report's head
        return lines[0]
    return " ".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pipepart`` command."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    terminated = _on_sigterm()
    try:
        return int(args.func(args))
    except (PipepartError, OSError) as e:
        if args.debug:
            traceback.print_exc()
        hint = (
            "; --debug shows its traceback"
            if isinstance(e, FactoryError) and not args.debug
            else ""
        )
        print(f"pipepart {args.command}: error: {_one_line(str(e))}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if terminated:
            print(f"pipepart {args.command}: terminated", file=sys.stderr)
            return 128 + signal.SIGTERM
        print(f"pipepart {args.command}: interrupted", file=sys.stderr)
        return 130


def _on_sigterm() -> list[int]:
    """Make SIGTERM stop the command as Ctrl-C does (every rank it started is killed first; see
    [Note: no orphan ranks] in `pipeline.launch.spawn`); the list it returns is non-empty once
    SIGTERM arrived. Only the main thread can install it (else SIGTERM keeps its default)."""
    received: list[int] = []

    def stop(signum: int, frame: object) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
    return received


if __name__ == "__main__":  # python -m pipeline.cli.command (python -m pipeline.cli is the same)
    sys.exit(main())
