"""How fast is the schedule simulator? Build, validate and simulate large schedules, timed.

Question: can ``simulate`` run 1,024 stages × 4,096 micro-batches of 1F1B (8.4 M compute
actions, 16.8 M implied sends and receives) in under 5 s, and what do building the
``Action`` objects and validating cost beside it?

Run:  python -m benchmarks.simulate_speed [--quick] [--repeats N] [--out PATH]

``--quick`` uses sizes that finish in well under a minute. Each case is timed ``--repeats``
times (the large side cases once) and the median is reported, wall-clock and CPU seconds:
on a shared machine the two differ by the time spent waiting for a core. Compare rows from
one run only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from partition.schedules.actions import Schedule, build_schedule, with_communication
from partition.schedules.check import validate
from partition.schedules.simulate import simulate

RESULTS = Path(__file__).resolve().parent / "results" / "simulate_speed.json"
TARGET_S = 5.0

# (schedule, ranks, micro-batches, virtual stages per rank, what is timed)
FULL = [
    ("1f1b", 1024, 4096, 1, "simulate"),
    ("gpipe", 1024, 4096, 1, "simulate"),
    ("zb-h1", 512, 4096, 1, "simulate"),
    ("interleaved", 256, 4096, 4, "simulate"),
    ("1f1b", 64, 1024, 1, "explicit"),
    ("1f1b", 64, 1024, 1, "validate"),
]
QUICK = [
    ("1f1b", 256, 1024, 1, "simulate"),
    ("gpipe", 256, 1024, 1, "simulate"),
    ("zb-h1", 128, 1024, 1, "simulate"),
    ("interleaved", 64, 1024, 4, "simulate"),
    ("1f1b", 32, 256, 1, "explicit"),
    ("1f1b", 32, 256, 1, "validate"),
]


_CPU: list[float] = []  # CPU seconds of the last _timed call's median run


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall-clock seconds of ``repeats`` calls (its CPU seconds go to ``_CPU``).

    On a shared machine wall-clock time includes waiting for a core; CPU time does not.
    """
    runs, out = [], None
    for _ in range(repeats):
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        runs.append((time.perf_counter() - t0, time.process_time() - c0))
    runs.sort()
    _CPU[:] = [runs[len(runs) // 2][1]]
    return runs[len(runs) // 2][0], out


def _run_case(
    name: str, p: int, m: int, v: int, what: str, repeats: int, headline: bool
) -> dict[str, float | int | str]:
    build_s, sched = _timed(lambda: build_schedule(name, p, m, virtual=v), 1)
    build_cpu_s = _CPU[0]
    assert isinstance(sched, Schedule)
    times = {"forward_time": 1.0, "backward_time": 2.0, "comm_time": 0.1}
    actions = sum(len(r) for r in sched.actions)
    row: dict[str, float | int | str] = {
        "schedule": name,
        "ranks": p,
        "stages": sched.num_stages,
        "microbatches": m,
        "timed": what,
        "compute_actions": actions,
        "build_s": round(build_s, 3),
        "build_cpu_s": round(build_cpu_s, 3),
    }
    reps = repeats if headline or actions < 4_000_000 else 1  # big side cases: once
    if what == "simulate":
        secs, result = _timed(lambda: simulate(sched, **times), reps)
        row["bubble"] = round(result.bubble_fraction, 6)
    elif what == "explicit":  # insert the sends and receives, then simulate those
        comm_s, comm = _timed(lambda: with_communication(sched), reps)
        secs, result = _timed(lambda: simulate(comm, **times), reps)
        row["with_communication_s"] = round(comm_s, 3)
        row["all_actions"] = sum(len(r) for r in comm.actions)
        row["bubble"] = round(result.bubble_fraction, 6)
    else:
        secs, _ = _timed(lambda: validate(sched), reps)
    row["seconds"] = round(secs, 3)
    row["cpu_s"] = round(_CPU[0], 3)
    row["actions_per_s"] = round(actions / secs)
    return row


def _table(rows: list[dict[str, float | int | str]]) -> str:
    cols = ["schedule", "ranks", "stages", "microbatches", "compute_actions", "timed"]
    cols += ["seconds", "cpu_s", "actions_per_s", "build_s", "bubble"]
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(x.rjust(w) for x, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, < 1 minute")
    parser.add_argument("--repeats", type=int, default=3, help="timings per case (median)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args(argv)

    rows = []
    for n, case in enumerate(QUICK if args.quick else FULL):
        rows.append(_run_case(*case, repeats=args.repeats, headline=n == 0))
        print(
            f"  done: {rows[-1]['schedule']} p={rows[-1]['ranks']} {rows[-1]['timed']}", flush=True
        )
    print(_table(rows))
    head = rows[0]
    verdict = {
        "case": f"{head['schedule']} {head['stages']} stages x {head['microbatches']} micro-batches",
        "simulate_s": head["seconds"],
        "simulate_cpu_s": head["cpu_s"],
        "build_s": head["build_s"],
        "build_cpu_s": head["build_cpu_s"],
        "target_s": TARGET_S,
        "simulate_under_target": float(head["seconds"]) < TARGET_S,
        "build_plus_simulate_under_target": float(head["seconds"]) + float(head["build_s"])
        < TARGET_S,
    }
    print(
        f"\n{verdict['case']}: simulate {head['seconds']} s ({head['cpu_s']} s CPU), building "
        f"the Action lists "
        f"{head['build_s']} s (target {TARGET_S} s for simulate)"
    )
    report = {
        "quick": args.quick,
        "machine": {
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "verdict": verdict,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
