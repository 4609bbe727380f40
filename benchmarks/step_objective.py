"""Does the step objective predict faster steps than the bottleneck objective, and what does it
cost to solve?

Question: over GPT-like graphs (the `partition_speed` generator) on identical and on mixed
devices, every built-in schedule and 4-32 micro-batches, how much faster is the step the
simulator predicts for the ``step`` objective's split than for the ``bottleneck`` one's, is it
ever slower, and how much longer does the solve take (CPU seconds, the two objectives
interleaved A B A B, medians)?

Run:  python -m benchmarks.step_objective [--quick] [--repeats N] [--out PATH]

``J`` is the objective's own value ``lambda B + S`` (see [Note: step objective] in
`partition.algorithms.step`), ``sim`` the simulator's step of each split (what a plan reports);
gains are ``1 - step / bottleneck``, so positive means the step objective's split is faster.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.partition_speed import devices_for, transformer
from partition.algorithms.objective import Bounds
from partition.algorithms.optimal import memory_fits
from partition.algorithms.problem import Problem
from partition.algorithms.step import step_lambda
from partition.graph import LinearGraph
from partition.schedules.custom import schedule_for
from partition.schedules.names import SCHEDULE_NAMES, stages_per_rank
from partition.schedules.simulate import simulate
from partition.solve import solve

RESULTS = Path(__file__).resolve().parent / "results"
QUESTION = __doc__.splitlines()[0] + " " + __doc__.splitlines()[1]


def simulated_step(problem: Problem, bounds: Bounds) -> float:
    """The simulator's step for ``bounds``, as `partition.planning.predict` prices a plan."""
    g, costs = problem.graph, problem.costs
    k = problem.num_stages
    fwd, bwd = [], []
    for s in range(k):
        d, i, j = problem.stage_device(s), bounds[s], bounds[s + 1]
        f = float(g.forward[i:j].sum()) / d.flops
        f += float(g.dispatched[i:j].sum()) * d.dispatch_forward + 0.5 * d.action_overhead
        fwd.append(f)
        bwd.append(max(float(costs.compute_time(s, i, j)) - f, 0.0))
    comm = []
    for s in range(k - 1):
        c, d = float(g.cut_bytes[bounds[s + 1]]), problem.stage_device(s)
        comm.append(d.latency + c / d.bandwidth if c else 0.0)
    built = schedule_for(
        problem.schedule, len(problem.devices), problem.microbatches, problem.virtual
    )
    return float(simulate(built, forward_time=fwd, backward_time=bwd, comm_time=comm).step_time)


def _case(
    label: str, graph: LinearGraph, devices: list[Any], schedule: str, m: int, repeats: int
) -> dict[str, Any] | None:
    virtual = stages_per_rank(schedule, 2 if schedule == "interleaved" else 1)
    if schedule == "interleaved" and m % len(devices):
        return None
    base = Problem(
        graph=graph, devices=tuple(devices), schedule=schedule, microbatches=m, virtual=virtual
    )
    times: dict[str, list[float]] = {"bottleneck": [], "step": []}
    bounds: dict[str, Bounds] = {}
    if not memory_fits(base):  # sized for 1F1B: GPipe holds every micro-batch
        return None
    for _ in range(repeats):
        for objective in ("bottleneck", "step"):  # interleaved
            gc.collect()
            t0 = time.process_time()
            sol = solve(
                graph,
                devices,
                schedule=schedule,
                microbatches=m,
                virtual=virtual,
                objective=objective,
            )
            times[objective].append(time.process_time() - t0)
            bounds[objective] = sol.bounds
    problem = replace(base, objective="step")
    lam, costs = step_lambda(problem), problem.costs

    def j(b: Bounds) -> float:
        return lam * float(costs.split_times(b).max()) + costs.split_units(b) * costs.unit

    sim = {o: simulated_step(problem, b) for o, b in bounds.items()}
    tb, ts = statistics.median(times["bottleneck"]), statistics.median(times["step"])
    return {
        "graph": label,
        "devices": ",".join(sorted({d.name.split(":")[0] for d in devices})),
        "stages": problem.num_stages,
        "schedule": schedule,
        "microbatches": m,
        "bottleneck_cpu_s": round(tb, 4),
        "step_cpu_s": round(ts, 4),
        "time_ratio": round(ts / tb, 3) if tb else None,
        "same_split": bounds["bottleneck"] == bounds["step"],
        "j_gain": 1.0 - j(bounds["step"]) / j(bounds["bottleneck"]),
        "sim_bottleneck_s": sim["bottleneck"],
        "sim_step_s": sim["step"],
        "sim_gain": 1.0 - sim["step"] / sim["bottleneck"],
    }


def _mixed(graph: LinearGraph, k: int) -> list[Any]:
    """``k`` devices alternating H100-like and A100-like (2.5x slower, the same memory)."""
    fast = devices_for(graph, k)
    return [
        d if i % 2 == 0 else replace(d, name=f"a100:{i}", flops=d.flops / 2.5, bandwidth=25e9)
        for i, d in enumerate(fast)
    ]


def run(quick: bool, repeats: int) -> list[dict[str, Any]]:
    rows = []
    sizes = (1_000,) if quick else (1_000, 10_000)
    counts = (4, 8) if quick else (4, 8, 16, 32)
    for n in sizes:
        graph = transformer(n, hidden=2048, tokens=4096)
        for k in (8,) if quick else (8, 16):
            for kind, devices in (("same", devices_for(graph, k)), ("mixed", _mixed(graph, k))):
                for schedule in SCHEDULE_NAMES:
                    for m in counts:
                        row = _case(f"{n}/{kind}", graph, devices, schedule, m, repeats)
                        if row is not None:
                            rows.append(row)
                            print(_line(row), flush=True)
    return rows


def _line(r: dict[str, Any]) -> str:
    return (
        f"{r['graph']:>11} {r['stages']:>3} {r['schedule']:>11} {r['microbatches']:>3} | "
        f"{r['bottleneck_cpu_s']:>8.4f} {r['step_cpu_s']:>8.4f} {r['time_ratio']:>6.2f} | "
        f"{r['j_gain']:>8.3%} {r['sim_gain']:>8.3%}"
    )


def summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    ratios = [r["time_ratio"] for r in rows if r["time_ratio"]]
    sim = np.array([r["sim_gain"] for r in rows])
    return {
        "cases": len(rows),
        "different_split": int(sum(not r["same_split"] for r in rows)),
        "sim_faster": int((sim > 1e-9).sum()),
        "sim_slower": int((sim < -1e-9).sum()),
        "sim_gain_max": float(sim.max()) if sim.size else 0.0,
        "sim_gain_min": float(sim.min()) if sim.size else 0.0,
        "j_gain_max": max((r["j_gain"] for r in rows), default=0.0),
        "time_ratio_median": statistics.median(ratios) if ratios else None,
        "time_ratio_max": max(ratios, default=None),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1k nodes, 8 stages only")
    parser.add_argument("--repeats", type=int, default=3, help="solves per objective (median)")
    parser.add_argument("--out", type=Path, default=RESULTS / "step_objective.json")
    args = parser.parse_args(argv)
    head = (
        f"{'graph':>11} {'k':>3} {'schedule':>11} {'m':>3} | {'bneck s':>8} {'step s':>8} "
        f"{'ratio':>6} | {'J gain':>8} {'sim gain':>8}"
    )
    print(head)
    print("-" * len(head))
    rows = run(args.quick, max(1, args.repeats))
    verdict = summary(rows)
    print(json.dumps(verdict, indent=2))
    data = {
        "question": QUESTION,
        "command": "python -m benchmarks.step_objective" + (" --quick" if args.quick else ""),
        "quick": args.quick,
        "machine": {"python": sys.version.split()[0], "platform": platform.platform()},
        "summary": verdict,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
