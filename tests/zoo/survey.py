"""The zoo survey: every model (or those named) planned at real size and trained at tiny size.

    python tests/zoo/survey.py [NAME ...] [--setups all|tests] [--out FILE]

Prints the table model x plan x run (in every `Setup`: 2 and 3 ranks, 1f1b and gpipe) x largest
relative difference (see [Note: the zoo's comparison] in `zoo.parity`), with the first line of
each error, and writes it as Markdown to ``--out`` (default /work/notes/zoo-survey.md when that folder exists).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # as under pytest: `partition`, `zoo`

import torch  # noqa: E402

from zoo.models import ZOO  # noqa: E402
from zoo.parity import SETUPS, Outcome, Setup, check_plan, check_runs, first_line  # noqa: E402

_NOTES = Path("/work/notes")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _run_cell(run: Outcome) -> str:
    if run.error or run.problems:
        return _cell(run.summary())
    worst = "nan" if math.isnan(run.worst) else f"{run.worst:.2g}"
    return f"{'ok' if run.ok else 'DIFFERS'} {worst}"


def table(plans: dict[str, str], runs: dict[Setup, dict[str, Outcome]]) -> str:
    """The survey as a Markdown table: a model per row, a column per setup (each cell: ok or
    DIFFERS and the largest relative difference, or the error)."""
    setups = list(runs)
    head = " | ".join(f"run (tiny, {s})" for s in setups)
    lines = [
        f"| model | library | plan (real, 4 devices, meta) | {head} |",
        "| --- | --- | --- |" + " --- |" * len(setups),
    ]
    for name, plan in plans.items():
        cells = " | ".join(_run_cell(runs[s][name]) for s in setups)
        lines.append(f"| {name} | {ZOO[name].library} | {_cell(plan)} | {cells} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"zoo models (default all: {', '.join(ZOO)})")
    parser.add_argument(
        "--out", type=Path, default=_NOTES / "zoo-survey.md" if _NOTES.is_dir() else None
    )
    parser.add_argument("--no-plan", action="store_true", help="skip the real-size plans")
    parser.add_argument(
        "--setups",
        choices=("all", "tests"),
        default="all",
        help="every setup (2 and 3 ranks x 1f1b and gpipe), or the two the test suite runs",
    )
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in ZOO]
    if unknown:
        parser.error(f"unknown zoo models {unknown}; choose from {', '.join(ZOO)}")
    names = args.names or list(ZOO)
    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)

    start = time.monotonic()
    plans: dict[str, str] = {}
    for name in names:
        t = time.monotonic()
        try:
            plans[name] = "skipped" if args.no_plan else check_plan(name)
        except Exception as e:
            plans[name] = f"{type(e).__name__}: {first_line(str(e))}"
        print(f"plan {name}: {plans[name]} ({time.monotonic() - t:.1f} s)", flush=True)
    planned = time.monotonic()
    setups = SETUPS if args.setups == "all" else SETUPS[:2]
    runs: dict[Setup, dict[str, Outcome]] = {}
    for setup in setups:
        runs[setup] = check_runs(names, setup)
        ok = sum(o.ok for o in runs[setup].values())
        print(f"runs ({setup}): {ok} of {len(names)} ok", flush=True)
    finished = time.monotonic()
    text = table(plans, runs)
    passed = sum(
        1
        for n in names
        if all(runs[s][n].ok for s in setups) and plans[n].startswith(("ok", "skipped"))
    )
    footer = (
        f"\n\n{passed} of {len(names)} pass. Plans {planned - start:.0f} s, runs "
        f"{finished - planned:.0f} s (torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})."
    )
    print(text + footer)
    if args.out is not None:
        args.out.write_text(
            "# Zoo survey (`python tests/zoo/survey.py`)\n\n" + text + footer + "\n"
        )
    return 0 if passed == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
