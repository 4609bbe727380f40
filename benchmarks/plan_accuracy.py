"""Do pipepart's plans hold on this machine? Every block-boundary split, predicted and measured.

Question (issue 20): once the machine is calibrated (`pipeline.calibrate.calibrate`, what
``pipepart calibrate`` writes), does a plan's predicted step time rank the splits of a model as the
runtime does, and agree with it, for a compute-bound and a latency-bound model; is pipepart's own
plan the fastest split measured; does its predicted peak memory per rank hold? Targets: the plan
within 5 % of the fastest measured split; Spearman rank correlation of predicted and measured step
times >= 0.8; median |predicted / measured - 1| <= 10 % (goal 5 %); predicted peak memory per
rank within 15 % of measured.

Run:  python -m benchmarks.plan_accuracy [--quick] [--steps N] [--calib FILE] [--out PATH]

Writes ``results/plan_accuracy.json`` and ``results/plan_accuracy.png`` (predicted against measured,
one point per split, pipepart's plan circled). The machine is calibrated first (or ``--calib``
reads a spec file). Each group (a model on 2 or 3 gloo ranks, 1F1B, 4 micro-batches, SGD) takes
every split at block boundaries (a sample of 30 when there are more) and pipepart's own plan;
its predictions come from the plan of each split (`partition.plan_analysis` with ``bounds=``, on
the calibrated device). Its spawned ranks (one thread each) build one `Pipeline` per split
(``PipelineOptions(bounds=...)``) and step them in turn, the order rotating every round, so that
all splits of a group share the machine's load; a split's **measured** step is the median over
rounds of the slowest rank's ``Pipeline.step``. **Memory** per rank: the state its tensors hold
(parameters, buffers, optimizer state, receive buffers), counted from the real tensors, plus the
resident-set growth of a step started with no gradients (``VmHWM`` reset before it); against
the plan's predicted total of that rank's stages. The 3-rank groups run on 2 cores here: ranks
wait for a core, which no plan for one core per rank predicts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from benchmarks import _workloads
from benchmarks.schedules import _step_memory

RESULTS = Path(__file__).resolve().parent / "results" / "plan_accuracy.json"
TARGETS = {"plan_vs_fastest": 0.05, "spearman": 0.8, "median_error": 0.10, "memory_error": 0.15}
SAMPLE = 30
MIB = 2**20


def _groups(quick: bool) -> list[tuple[str, Any, int]]:
    """(name, workload, ranks)."""
    if quick:
        return [("latency-bound GPT", _workloads.Workload("gpt", 32, 4, 2, 4), 2)]
    compute = _workloads.Workload("gpt", 256, 12, 4, 4)
    latency = _workloads.Workload("gpt", 32, 12, 2, 4)
    return [
        ("compute-bound GPT", compute, 2),
        ("latency-bound GPT", latency, 2),
        ("HF GPT-2", _workloads.HFGPT2(), 2),
        ("compute-bound GPT", compute, 3),
        ("latency-bound GPT", latency, 3),
    ]


# --- on each rank ---------------------------------------------------------------------------


def _state_bytes(pipe: Any) -> int:
    """Parameters, buffers, optimizer state and receive buffers this rank holds (no gradients)."""
    tensors = {id(t): t for t in pipe.parameters}
    tensors.update({id(t): t for t in pipe.named_buffers().values()})
    if pipe.optimizer is not None:
        for state in pipe.optimizer.state.values():
            tensors.update({id(t): t for t in state.values() if isinstance(t, torch.Tensor)})
    for pool in pipe.rank_executor._pools.values():
        for buffers in pool._free:
            tensors.update({id(t): t for t in buffers})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _rank(
    workload: Any, splits: list[tuple[int, ...]], warmup: int, steps: int
) -> list[dict[str, Any]]:
    from pipeline.runtime.pipeline import Pipeline, PipelineOptions

    args, target = _workloads.batch(workload)
    inputs: Any = args
    if isinstance(workload, _workloads.HFGPT2):  # keyword inputs
        inputs = {"input_ids": args[0], "attention_mask": torch.ones_like(args[0])}
    pipes = [
        Pipeline(
            workload,
            options=PipelineOptions(
                schedule="1f1b", microbatches=workload.microbatches, bounds=bounds
            ),
            optimizer_factory=lambda ps: torch.optim.SGD(ps, lr=1e-4),
        )
        for bounds in splits
    ]
    out: list[dict[str, Any]] = [{"times": [], "growth": []} for _ in splits]
    for k in range(warmup + steps):
        for j in range(len(pipes)):
            i = (j + k) % len(pipes)
            pipes[i].zero_grad()
            base = _step_memory()
            dist.barrier()
            start = time.perf_counter()
            pipes[i].step(inputs, target)
            wall = time.perf_counter() - start
            if k >= warmup:
                out[i]["times"].append(wall)
                out[i]["growth"].append(_workloads.rss_mib()[1] - base)
    for pipe, o in zip(pipes, out, strict=True):
        o["state_bytes"] = _state_bytes(pipe)
    return out


# --- the group: splits, predictions, measurements -------------------------------------------


def _block_starts(paths: Sequence[str]) -> list[int]:
    """The index of each block's first node but the first block's: the block boundaries."""
    first: dict[int, int] = {}
    for i, path in enumerate(paths):
        found = re.search(r"(?:^|\.)h\.(\d+)(?:\.|$)", path)
        if found:
            first.setdefault(int(found.group(1)), i)
    return [first[b] for b in sorted(first)][1:]


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    def ranks(x: Sequence[float]) -> list[float]:
        order = sorted(range(len(x)), key=x.__getitem__)
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for t in range(i, j + 1):
                r[order[t]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    if len(a) < 2 or len(set(ra)) < 2 or len(set(rb)) < 2:
        return float("nan")
    return float(statistics.correlation(ra, rb))


def run_group(
    name: str, workload: Any, ranks: int, device: Any, quick: bool, steps: int
) -> dict[str, Any]:
    from partition import analyze, plan_analysis
    from partition.memory import MemoryModel
    from partition.models.registry import build_meta_model
    from partition.options import PlanOptions
    from pipeline.launch.spawn import spawn_ranks

    m = workload.microbatches
    built = build_meta_model(workload)
    analysis = analyze(built.model, built.args or (), built.kwargs, microbatches=m)
    devices = [replace(device, name=f"{device.name}:{r}") for r in range(ranks)]
    options = PlanOptions(schedule="1f1b", microbatches=m, memory=MemoryModel(optimizer="sgd"))
    own = plan_analysis(analysis, devices, options)
    n = len(analysis.graph)
    starts = _block_starts(analysis.graph.module_paths)
    splits = [(0, *c, n) for c in itertools.combinations(starts, ranks - 1)]
    if len(splits) > SAMPLE - 1:
        splits = random.Random(0).sample(splits, SAMPLE - 1)
    if own.bounds not in splits:
        splits.append(own.bounds)
    plans = [plan_analysis(analysis, devices, replace(options, bounds=b)) for b in splits]
    outcomes = spawn_ranks(
        _rank,
        ranks,
        (workload, splits, 1 if quick else 2, steps),
        timeout=3600,
        pg_timeout=600,
        start_method="forkserver",
        preload=("torch._dynamo", "pipeline.runtime.pipeline", "benchmarks._workloads"),
    )
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise RuntimeError("\n".join(f"{o.describe()}\n{o.traceback}" for o in failed))
    rows = []
    for i, (bounds, plan) in enumerate(zip(splits, plans, strict=True)):
        per_rank = [o.value[i] for o in outcomes]
        walls = [max(r["times"][k] for r in per_rank) for k in range(steps)]
        measured = statistics.median(walls)
        predicted_mib = [0.0] * ranks
        for s, stage in enumerate(plan.stages):
            predicted_mib[s % ranks] += stage.memory["total"] / MIB
        measured_mib = [r["state_bytes"] / MIB + statistics.median(r["growth"]) for r in per_rank]
        rows.append(
            {
                "bounds": list(bounds),
                "blocks": [starts.index(b) + 1 if b in starts else None for b in bounds[1:-1]],
                "plan": bounds == own.bounds,
                "predicted_s": plan.step_time,
                "measured_s": measured,
                "error": plan.step_time / measured - 1,
                "fastest_s": min(walls),
                "fastest_error": plan.step_time / min(walls) - 1,
                "predicted_mib": predicted_mib,
                "measured_mib": measured_mib,
                "memory_error": [
                    p / q - 1 for p, q in zip(predicted_mib, measured_mib, strict=True)
                ],
                "state_mib": [r["state_bytes"] / MIB for r in per_rank],
                "step_growth_mib": [statistics.median(r["growth"]) for r in per_rank],
            }
        )
    fastest = min(r["measured_s"] for r in rows)
    mine = next(r for r in rows if r["plan"])
    errors = [abs(r["error"]) for r in rows]
    memory = [abs(e) for r in rows for e in r["memory_error"]]
    summary = {
        "group": name,
        "workload": workload.describe(),
        "ranks": ranks,
        "splits": len(rows),
        "plan_bounds": list(own.bounds),
        "plan_measured_s": mine["measured_s"],
        "plan_predicted_s": mine["predicted_s"],
        "fastest_measured_s": fastest,
        "plan_vs_fastest": mine["measured_s"] / fastest - 1,
        "spearman": _spearman([r["predicted_s"] for r in rows], [r["measured_s"] for r in rows]),
        "median_error": statistics.median(errors),
        "max_error": max(errors),
        "fastest_median_error": statistics.median(abs(r["fastest_error"]) for r in rows),
        "fastest_spearman": _spearman(
            [r["predicted_s"] for r in rows], [r["fastest_s"] for r in rows]
        ),
        "memory_median_error": statistics.median(memory),
        "memory_max_error": max(memory),
    }
    return {**summary, "points": rows}


# --- report ---------------------------------------------------------------------------------


def _plot(path: Path, groups: list[dict[str, Any]]) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(groups), 4.2), layout="constrained")
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, g in zip(axes, groups, strict=True):
        ms = [r["measured_s"] * 1e3 for r in g["points"]]
        ps = [r["predicted_s"] * 1e3 for r in g["points"]]
        ax.scatter(ms, ps, s=14, label="split")
        mine = next(r for r in g["points"] if r["plan"])
        ax.scatter(
            [mine["measured_s"] * 1e3],
            [mine["predicted_s"] * 1e3],
            s=90,
            facecolors="none",
            edgecolors="red",
            label="pipepart's plan",
        )
        lo, hi = min(ms + ps) * 0.9, max(ms + ps) * 1.1
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel("measured step (ms)")
        ax.set_ylabel("predicted step (ms)")
        ax.set_title(
            f"{g['group']}, {g['ranks']} ranks\nρ={g['spearman']:.2f}, "
            f"median err {g['median_error']:.0%}",
            fontsize=9,
        )
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)


_COLUMNS = (  # header, key, format
    ("group", "group", "{}"),
    ("ranks", "ranks", "{}"),
    ("splits", "splits", "{}"),
    ("plan ms", "plan_measured_s", "{:.4g}"),
    ("fastest ms", "fastest_measured_s", "{:.4g}"),
    ("plan vs fastest", "plan_vs_fastest", "{:+.1%}"),
    ("Spearman", "spearman", "{:.2f}"),
    ("median err", "median_error", "{:.1%}"),
    ("max err", "max_error", "{:.1%}"),
    ("fastest-step err", "fastest_median_error", "{:.1%}"),
    ("memory err", "memory_median_error", "{:.1%}"),
)


def _print(groups: list[dict[str, Any]], load: tuple[float, float]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"plan accuracy, calibrated (load {load[0]:.1f} → {load[1]:.1f})")
    for header, _, _ in _COLUMNS:
        table.add_column(header, justify="left" if header == "group" else "right")
    for g in groups:
        cells = [
            fmt.format(g[key] * 1e3 if key.endswith("_s") else g[key]) for _, key, fmt in _COLUMNS
        ]
        table.add_row(*cells)
    Console(width=160).print(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small group, a few steps")
    parser.add_argument("--steps", type=int, default=None, help="measured rounds (default 20)")
    parser.add_argument("--calib", default=None, help="a device spec file instead of calibrating")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    steps = args.steps or (3 if args.quick else 20)
    load0 = os.getloadavg()
    if args.calib:
        from partition.devices import read_spec_file

        device, measured = read_spec_file(args.calib), None
    else:
        from pipeline.calibrate import calibrate

        calibration = calibrate(
            progress=lambda line: print(f"calibrate: {line}", flush=True),
            repeats=1 if args.quick else 3,
        )
        device, measured = calibration.device, calibration.measured
    groups = []
    for name, workload, ranks in _groups(args.quick):
        print(f"{name} on {ranks} ranks: {workload.describe()}", flush=True)
        groups.append(run_group(name, workload, ranks, device, args.quick, steps))
        done = groups[-1]
        print(
            f"  plan {done['plan_measured_s'] * 1e3:.4g} ms, fastest split "
            f"{done['fastest_measured_s'] * 1e3:.4g} ms; Spearman {done['spearman']:.2f}, median "
            f"error {done['median_error']:.1%}, memory {done['memory_median_error']:.1%}",
            flush=True,
        )
    load = (load0[0], os.getloadavg()[0])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    _plot(png, groups)
    result = {
        "question": __doc__.splitlines()[0],
        "command": "python -m benchmarks.plan_accuracy" + (" --quick" if args.quick else ""),
        "quick": args.quick,
        "machine": _workloads.machine(load),
        "device": device.to_dict(),
        "calibration": measured,
        "targets": TARGETS,
        "steps": steps,
        "plot": png.name,
        "rows": groups,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    _print(groups, load)
    print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
