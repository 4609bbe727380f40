"""``pipepart bench``: run a benchmark of a source checkout's ``benchmarks/`` folder."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from partition.errors import PipepartError
from pipeline.cli.flags import add_command

__all__ = ["register"]

_EPILOG_BENCH = """examples:
  pipepart bench list
  pipepart bench partitioners --quick --out results/
  pipepart bench vs_pipelining --json
  pipepart bench gpu                    # one CUDA device: predicted vs measured stages
"""

_ALIASES = {"gpu": "gpu_check"}
"""Short names a user may type for a benchmark (``pipepart bench gpu``)."""

_BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
"""A checkout's benchmarks/ folder, beside the pipeline package's source tree (not installed)."""


def _benchmarks() -> list[str]:
    """The names of the benchmarks in the checkout's benchmarks/ folder.

    The folder is imported as the package ``benchmarks`` from its own path, so that another
    folder of that name on ``sys.path`` (the user's own) is never taken for it.
    """
    import importlib.util
    import pkgutil

    init = _BENCHMARKS / "__init__.py"
    if not (init.is_file() and (_BENCHMARKS.parent / "pyproject.toml").is_file()):  # a checkout
        raise PipepartError(
            f"no benchmarks/ folder at {_BENCHMARKS}: `pipepart bench` runs the benchmarks of a "
            "source checkout, which an installed pipepart does not include; clone the repository "
            "and run `pip install -e .` in it"
        )
    package = sys.modules.get("benchmarks")
    if package is None:
        spec = importlib.util.spec_from_file_location(
            "benchmarks", init, submodule_search_locations=[str(_BENCHMARKS)]
        )
        assert spec is not None and spec.loader is not None
        package = importlib.util.module_from_spec(spec)
        sys.modules["benchmarks"] = package
        spec.loader.exec_module(package)
    elif [Path(p).resolve() for p in package.__path__] != [_BENCHMARKS]:
        raise PipepartError(
            f"another package named benchmarks is imported ({list(package.__path__)}), not "
            f"{_BENCHMARKS}; run pipepart bench from another directory"
        )
    found = pkgutil.iter_modules([str(_BENCHMARKS)])
    return sorted(m.name for m in found if not m.name.startswith("_"))


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    names = _benchmarks()
    if args.name == "list":
        for name in names:
            module = importlib.import_module(f"benchmarks.{name}")
            first = (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""
            print(f"{name:20s} {first}")
        return 0
    name = _ALIASES.get(args.name, args.name.replace("-", "_"))
    if name not in names:
        raise PipepartError(
            f"no benchmark {args.name!r}; choose one of {', '.join(names)} (or `pipepart bench list`)"
        )
    module = importlib.import_module(f"benchmarks.{name}")
    out = Path(args.out) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [*(["--quick"] if args.quick else []), "--out", str(out)]
    if not args.json:
        return int(module.main(argv) or 0)
    with contextlib.redirect_stdout(sys.stderr):  # the table goes to stderr, the JSON to stdout
        code = int(module.main(argv) or 0)
    if code == 0:
        print(json.dumps(json.loads(out.read_text())))
    return code


def register(sub: Any) -> None:
    """Add ``bench`` to the sub-command parsers ``sub``."""
    bench = add_command(
        sub,
        "bench",
        _cmd_bench,
        help="run a benchmark from benchmarks/ (`pipepart bench list` names them)",
        epilog=_EPILOG_BENCH,
        json_help="print the benchmark's JSON results on stdout",
    )
    bench.add_argument("name", help="a benchmark's name, or `list`")
    bench.add_argument(
        "--quick", action="store_true", help="the quick mode CI runs (under a minute)"
    )
    bench.add_argument(
        "--out",
        default=".",
        metavar="DIR",
        help="folder for NAME.json (and its plot, if any); default the current directory",
    )
