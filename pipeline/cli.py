"""The ``pipepart`` command: plan, show, simulate, run and bench.

Every sub-command prints a table for people and, with ``--json``, one JSON object on stdout for
scripts. Errors are one line on stderr and a non-zero exit (``--debug`` shows the traceback).
Each sub-command lives in the module that names it — `pipeline.cli_plan` (``plan``, ``show``,
``simulate``), `pipeline.cli_run`, `pipeline.cli_bench` — with the flags it reads; the flags they
share, and the options those make, are `pipeline.cli_common`'s.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from partition.errors import FactoryError, PipepartError
from pipeline import cli_bench, cli_checkpoint, cli_plan, cli_run

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipepart",
        description="Split a PyTorch model into pipeline stages, predict it, and train it across ranks.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (cli_plan, cli_run, cli_checkpoint, cli_bench):
        command.register(sub)
    return parser


def _one_line(message: str) -> str:
    """The line of an error that says what went wrong (a multi-rank report names the failed rank)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return "failed"
    for line in lines:
        if line.startswith("rank ") and "killed by the launcher" not in line:
            return line
    return lines[0]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pipepart`` command."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (PipepartError, OSError) as e:
        if args.debug:
            raise
        hint = "; --debug shows its traceback" if isinstance(e, FactoryError) else ""
        print(f"pipepart {args.command}: error: {_one_line(str(e))}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pipepart {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
