"""Does a split backward (I then W) cost no more than a plain backward B?

Question (issue 21): on one stage, one thread, what is F + I + W against F + B per micro-batch,
with W computed from the saved inputs (`pipeline.runtime.stage`, [Note: weight gradients
without the engine]) and with the engine-driven W it replaces? Target: I + W <= B (ratio <= 1.0).

Run:  python -m benchmarks.split_backward [--quick] [--reps N] [--out PATH]

The stage is the second of the bundled GPT cut in two by pipepart's partitioner (the last stage:
blocks, final norm, LM head and loss), the workload of `benchmarks.schedules`. One process, one
thread; the three variants run interleaved (A B C A B C ...) on the same micro-batch, each
repetition timed by wall clock and by thread CPU time; reported are medians and their ratios to
F + B. The "engine W" variant is the per-group ``torch.autograd.backward`` that W falls back to.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import _workloads

RESULTS = Path(__file__).resolve().parent / "results" / "split_backward.json"
VARIANTS = ("F+B", "F+I+W", "F+I+W engine W")


def _stage(quick: bool) -> tuple[Any, Any, list[Any], list[Any], str]:
    """Executors on the last stage (the same modules), the stage inputs and the targets."""
    from partition import analyze
    from partition.models.registry import build_meta_model
    from partition.split import split
    from pipeline.runtime.init import materialize
    from pipeline.runtime.stage import StageExecutor

    m = 4
    workload = _workloads.gpt(m, layers=4, rows=1, width=128) if quick else _workloads.gpt(m)
    built = build_meta_model(workload)
    analysis = analyze(built.model, built.args or (), built.kwargs, microbatches=m)
    from benchmarks.vs_pipelining import _bounds

    stages = split(analysis.traced, analysis.graph, _bounds(workload, 2, "zb-h1", 1))
    hook = getattr(built.model, "_init_weights", None)
    for s in stages:
        materialize(s.module, torch.device("cpu"), seed=0, init_hook=hook)
    inputs, target = _workloads.batch(workload)
    first = StageExecutor(stages[0])
    acts = [first.evaluate([t.tensor_split(m)[i] for t in inputs]) for i in range(m)]
    make = lambda: StageExecutor(stages[1], loss_fn=workload.loss_fn, loss_scale=1 / m)  # noqa: E731
    plain, engine = make(), make()
    engine._direct = False  # W through the engine, one call per weight group
    return (plain, engine), acts, list(target.tensor_split(m)), workload.describe()


def _variants(execs: tuple[Any, Any], x: list[Any], y: Any) -> dict[str, Callable[[], None]]:
    plain, engine = execs

    def fb() -> None:
        plain.forward(0, x, y)
        plain.backward(0)

    def fiw(ex: Any) -> Callable[[], None]:
        def run() -> None:
            ex.forward(0, x, y)
            ex.backward_input(0)
            ex.backward_weight(0)

        return run

    return dict(zip(VARIANTS, (fb, fiw(plain), fiw(engine)), strict=True))


def _grads_equal(execs: tuple[Any, Any], x: list[Any], y: Any) -> float:
    """Largest |difference| between the gradients of F + B and of F + I + W (one micro-batch)."""
    plain = execs[0]
    out = []
    for split in (False, True):
        for p in plain.parameters:
            p.grad = None
        plain.forward(0, x, y)
        if split:
            plain.backward_input(0)
            plain.backward_weight(0)
        else:
            plain.backward(0)
        out.append([p.grad.detach().clone() for p in plain.parameters])
    return max(float((a - b).abs().max()) for a, b in zip(*out, strict=True))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small GPT, few repetitions")
    parser.add_argument("--reps", type=int, default=None, help="repetitions of each variant")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args(argv)
    reps = args.reps or (5 if args.quick else 30)
    torch.set_num_threads(1)
    load0 = os.getloadavg()[0]
    execs, acts, targets, describe = _stage(args.quick)
    diff = _grads_equal(execs, acts[0], targets[0])
    runs = _variants(execs, acts[0], targets[0])
    for fn in runs.values():  # warm-up
        fn()
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(reps):
        for name, fn in runs.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.thread_time() - c0)
    load = (load0, os.getloadavg()[0])
    base_wall, base_cpu = statistics.median(wall["F+B"]), statistics.median(cpu["F+B"])
    rows = [
        {
            "variant": name,
            "wall_ms": statistics.median(wall[name]) * 1e3,
            "cpu_ms": statistics.median(cpu[name]) * 1e3,
            "wall_ratio": statistics.median(wall[name]) / base_wall,
            "cpu_ratio": statistics.median(cpu[name]) / base_cpu,
        }
        for name in runs
    ]
    print(
        f"{describe}, last of 2 stages, {reps} interleaved reps, load {load[0]:.1f} → {load[1]:.1f}"
    )
    print(f"{'variant':<16}{'wall ms':>10}{'CPU ms':>10}{'wall / F+B':>12}{'CPU / F+B':>12}")
    for r in rows:
        print(
            f"{r['variant']:<16}{r['wall_ms']:>10.2f}{r['cpu_ms']:>10.2f}"
            f"{r['wall_ratio']:>12.3f}{r['cpu_ratio']:>12.3f}"
        )
    print(f"max |grad(F+B) - grad(F+I+W)| = {diff:.1e}")
    report = {
        "question": "per micro-batch, F + I + W against F + B on one stage (one thread)",
        "command": "python -m benchmarks.split_backward" + (" --quick" if args.quick else ""),
        "quick": args.quick,
        "workload": describe,
        "reps": reps,
        "machine": _workloads.machine(load),
        "grad_max_abs_diff": diff,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
