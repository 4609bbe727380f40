"""How fast is the exact partitioner? Solve synthetic transformer graphs of 1k-100k nodes, timed.

Question: does ``solve(..., algorithm="optimal")`` split 10,000 nodes into 64 stages in under
0.5 s, 100,000 into 64 in under 2 s (goal 1 s), and a 96-block GPT (~2,000 nodes) into 8 in
under 0.2 s, growing near-linearly in the node count? And how long do the baselines take, and
how far from the lower bound are their splits?

Run:  python -m benchmarks.partition_speed [--quick] [--repeats N] [--out PATH]

Graphs repeat a pre-norm transformer block (layer norm, QKV, attention, projection, residual,
layer norm, MLP up, GELU, MLP down, residual, plus the views and dropouts an FX graph holds) with
analytic FLOPs, bf16 weights, the activations autograd saves and the live bytes across every
cut, each jittered by up to 10 %. Devices are H100-like, with memory sized so the model fits
with about 40 % headroom under 1F1B. Each case is the median of ``--repeats`` solves (the
largest fewer); numbers are wall-clock seconds (and, for optimal, CPU seconds, steadier on a
shared machine) on the machine that runs it, so compare rows of one run. ``--quick`` skips the
100k-node rows and runs in well under a minute.

Worst cases, timed apart (optimal only): ``huge head`` — the last node (the LM head) given three
times a perfect stage's compute, so it alone sets the bottleneck, every other stage has slack and
the reachable windows span most of the graph; ``equal cuts`` — the same with every cut of one
width, so on identical devices every split of that bottleneck ties on total time and
communication and the peak-memory tie-break is bisected; ``min_devices`` — devices with a third
of the memory of the 64-stage rows, so the model needs about 130 of them and the error message
looks for the fewest (`partition.solve.min_devices`).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from partition.algorithms.problem import Problem
from partition.devices import Device
from partition.graph import LinearGraph
from partition.memory import MemoryModel
from partition.solve import ALGORITHMS, Solution, min_devices, solve

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS: dict[tuple[str | int, int], float] = {
    (10_000, 64): 0.5,
    (100_000, 64): 2.0,
    ("gpt96", 8): 0.2,
}
SIZES = (1_000, 10_000, 100_000)
STAGES = (2, 8, 64)

# One pre-norm block as an FX graph holds it, 20 nodes:
# (name, kind, params / H^2, saved / (tokens H), live across the cut after it / (tokens H)).
# "live" counts the residual stream plus every branch tensor still needed downstream.
_BLOCK: tuple[tuple[str, str, float, float, float], ...] = (
    ("ln1", "norm", 0.0, 1.0, 2.0),
    ("qkv", "linear", 3.0, 1.0, 4.0),
    ("split", "view", 0.0, 0.0, 4.0),
    ("q_view", "view", 0.0, 0.0, 4.0),
    ("k_view", "view", 0.0, 0.0, 4.0),
    ("v_view", "view", 0.0, 0.0, 4.0),
    ("q_t", "view", 0.0, 0.0, 4.0),
    ("k_t", "view", 0.0, 0.0, 4.0),
    ("v_t", "view", 0.0, 0.0, 4.0),
    ("attn", "attention", 0.0, 4.0, 2.0),
    ("attn_t", "view", 0.0, 0.0, 2.0),
    ("merge", "view", 0.0, 0.0, 2.0),
    ("proj", "linear", 1.0, 1.0, 2.0),
    ("drop1", "dropout", 0.0, 0.5, 2.0),
    ("add1", "add", 0.0, 0.0, 1.0),
    ("ln2", "norm", 0.0, 1.0, 2.0),
    ("fc1", "linear", 4.0, 1.0, 5.0),
    ("gelu", "act", 0.0, 4.0, 5.0),
    ("fc2", "linear", 4.0, 4.0, 2.0),
    ("add2", "add", 0.0, 0.0, 1.0),
)


def transformer(
    nodes: int,
    *,
    hidden: int = 4096,
    tokens: int = 4096,
    seq: int = 2048,
    vocab: int = 50_304,
    jitter: float = 0.1,
    seed: int = 0,
) -> LinearGraph:
    """A GPT-like `LinearGraph` of about ``nodes`` nodes (whole blocks, plus embedding and head).

    ``tokens`` per micro-batch, sequences of ``seq``; FLOPs count forward + backward (3x the
    forward's 2 per multiply-add); bf16 (2-byte) tensors; compute and saved bytes jittered by up
    to ``jitter``, cut widths by half that.
    """
    rng = np.random.default_rng(seed)
    blocks = max(1, (nodes - 4) // len(_BLOCK))
    h2 = float(hidden) ** 2
    th = float(tokens) * hidden * 2.0  # bytes of one (tokens, H) bf16 tensor
    names: list[str] = ["embed", "pos"]
    compute = [3.0 * tokens * hidden, 3.0 * tokens * hidden]
    params = [2.0 * vocab * hidden, 2.0 * seq * hidden]
    saved = [0.0, 0.0]
    live = [th, th]
    attn_flops = 3.0 * 4.0 * tokens * seq * hidden  # QK^T and AV, x3 for the backward
    for b in range(blocks):
        for name, kind, pr, sv, lv in _BLOCK:
            names.append(f"h.{b}.{name}")
            flops = 6.0 * tokens * h2 * pr  # 2 per multiply-add, x3 for the backward
            if kind == "attention":
                flops = attn_flops
            elif kind in ("norm", "act", "dropout", "add"):
                flops = 3.0 * 8.0 * tokens * hidden * (4.0 if kind == "act" else 1.0)
            compute.append(flops)
            params.append(2.0 * h2 * pr + (4.0 * hidden if kind == "norm" else 0.0))
            saved.append(th * sv)
            live.append(th * lv)
    names += ["ln_f", "head"]
    compute += [3.0 * 8.0 * tokens * hidden, 3.0 * 2.0 * tokens * hidden * vocab]
    params += [4.0 * hidden, 0.0]  # the head is tied to the embedding
    saved += [th, th]
    live += [2.0 * th, 0.0]
    n = len(names)
    c = np.asarray(compute) * (1.0 + jitter * rng.uniform(-1, 1, n))
    s = np.asarray(saved) * (1.0 + jitter * rng.uniform(0, 1, n))
    cuts = np.asarray(live[:-1]) * (1.0 + 0.5 * jitter * rng.uniform(0, 1, n - 1))
    return LinearGraph.from_arrays(
        c, np.asarray(params), s, np.round(cuts), forward=c / 3.0, names=tuple(names)
    )


def devices_for(
    graph: LinearGraph, k: int, microbatches: int = 8, headroom: float = 1.4
) -> list[Device]:
    """``k`` H100-like devices whose memory fits ``graph`` with ``headroom`` under 1F1B."""
    kappa = MemoryModel().bytes_per_param_byte(2.0)
    inflight = min(k, microbatches)
    need = kappa * float(graph.param_bytes.sum()) + inflight * float(graph.saved_bytes.sum())
    memory = int(headroom * need / k + 4 * float(graph.cut_bytes.max()))
    memory = max(
        memory, int(2 * (kappa * graph.param_bytes.max() + inflight * graph.saved_bytes.max()))
    )
    return [
        Device(name=f"h100:{i}", memory=memory, flops=400e12, bandwidth=50e9, latency=10e-6)
        for i in range(k)
    ]


def huge_head(graph: LinearGraph, k: int, equal_cuts: bool = False) -> LinearGraph:
    """``graph`` with its last node's compute three times a perfect stage's (and, with
    ``equal_cuts``, every interior cut the median width): the worst cases of the search."""
    compute = graph.compute.copy()
    compute[-1] = 3.0 * float(compute.sum()) / k
    cuts = graph.cut_bytes[1:-1].copy()
    if equal_cuts:
        cuts[:] = float(np.median(cuts))
    return LinearGraph.from_arrays(
        compute,
        graph.param_bytes,
        graph.saved_bytes,
        cuts,
        forward=compute / 3.0,
        names=graph.names,
    )


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """Median wall-clock and CPU seconds of ``repeats`` calls, and the last result."""
    wall, cpu, out = [], [], None
    for _ in range(repeats):
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu), out


def _case(label: str | int, graph: LinearGraph, k: int, repeats: int) -> dict[str, Any]:
    devices = devices_for(graph, k)
    row: dict[str, Any] = {"graph": label, "nodes": len(graph), "stages": k}
    for algorithm in ALGORITHMS:
        reps = repeats if algorithm == "optimal" else 1
        seconds, cpu, sol = _timed(lambda a=algorithm: solve(graph, devices, algorithm=a), reps)  # type: ignore[misc]
        assert isinstance(sol, Solution)
        ev = sol.evaluation
        row[algorithm] = {
            "seconds": round(seconds, 4),
            "cpu_seconds": round(cpu, 4),
            "balance_ratio": round(ev.balance_ratio, 5),
            "fits": ev.fits,
        }
    target = TARGETS.get((label, k))
    row["target_s"] = target
    return row


def _worst(label: str, graph: LinearGraph, repeats: int) -> dict[str, Any]:
    k = 64
    row: dict[str, Any] = {"case": label, "nodes": len(graph), "stages": k}
    if label == "min_devices":
        spec = devices_for(graph, k)[0]
        spec = replace(spec, memory=spec.memory // 3)
        problem = Problem(graph=graph, devices=(spec,) * k, schedule="1f1b", microbatches=8)
        seconds, cpu, count = _timed(lambda: min_devices(problem), repeats)
        row.update(seconds=round(seconds, 4), cpu_seconds=round(cpu, 4), result=f"{count} devices")
        return row
    devices = devices_for(graph, k)
    seconds, cpu, sol = _timed(lambda: solve(graph, devices), repeats)
    assert isinstance(sol, Solution)
    ratio = sol.evaluation.balance_ratio
    row.update(seconds=round(seconds, 4), cpu_seconds=round(cpu, 4), result=f"ratio {ratio:.4f}")
    return row


def run_worst(quick: bool, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for n in SIZES[1:]:
        if quick and n > 10_000:
            continue
        base = transformer(n, hidden=2048, tokens=4096)
        reps = repeats if n < 100_000 else max(1, repeats // 2)
        rows.append(_worst("huge head", huge_head(base, 64), reps))
        rows.append(_worst("equal cuts", huge_head(base, 64, equal_cuts=True), reps))
        rows.append(_worst("min_devices", base, reps))
    return rows


def run(quick: bool, repeats: int) -> list[dict[str, Any]]:
    rows = []
    gpt = transformer(96 * len(_BLOCK) + 4, hidden=12288, tokens=2048, seq=2048)
    rows.append(_case("gpt96", gpt, 8, repeats))
    for n in SIZES:
        if quick and n > 10_000:
            continue
        graph = transformer(n, hidden=2048, tokens=4096)
        for k in STAGES:
            rows.append(_case(n, graph, k, repeats if n < 100_000 else max(1, repeats // 2)))
    return rows


def _table(rows: Sequence[dict[str, Any]]) -> str:
    head = f"{'graph':>7} {'nodes':>7} {'k':>3} | {'optimal s':>9} {'cpu s':>7} {'ratio':>7} | "
    head += " | ".join(f"{a + ' s':>8} {'ratio':>7}" for a in ALGORITHMS[1:])
    lines = [head, "-" * len(head)]
    for r in rows:
        opt, target = r["optimal"], r["target_s"]
        line = f"{r['graph']!s:>7} {r['nodes']:>7} {r['stages']:>3} | "
        line += f"{opt['seconds']:>9.4f} {opt['cpu_seconds']:>7.4f} {opt['balance_ratio']:>7.4f} | "
        line += " | ".join(
            f"{r[a]['seconds']:>8.4f} {r[a]['balance_ratio']:>6.3f}{' ' if r[a]['fits'] else '*'}"
            for a in ALGORITHMS[1:]
        )
        if target is not None:
            line += f"  target {target:g} s: " + ("ok" if opt["seconds"] < target else "SLOW")
        lines.append(line)
    lines.append("ratio = bottleneck / perfect balance (1 is perfect); * = does not fit memory")
    return "\n".join(lines)


def _worst_table(rows: Sequence[dict[str, Any]]) -> str:
    head = f"{'worst case':>12} {'nodes':>7} {'k':>3} | {'optimal s':>9} {'cpu s':>7} | result"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['case']:>12} {r['nodes']:>7} {r['stages']:>3} | {r['seconds']:>9.4f} "
            f"{r['cpu_seconds']:>7.4f} | {r['result']}"
        )
    return "\n".join(lines)


def _plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    for k in STAGES:
        pts = sorted(
            (r["nodes"], r["optimal"]["seconds"])
            for r in rows
            if r["stages"] == k and r["graph"] != "gpt96"
        )
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"optimal, {k} stages")
    for a in ALGORITHMS[1:]:
        pts = sorted(
            (r["nodes"], r[a]["seconds"])
            for r in rows
            if r["stages"] == 64 and r["graph"] != "gpt96"
        )
        if pts:
            ax.plot(*zip(*pts, strict=True), linestyle="--", marker=".", label=f"{a}, 64 stages")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("nodes")
    ax.set_ylabel("seconds (median)")
    ax.set_title("partitioner time vs graph size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="skip 100k nodes (well under a minute)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="solves per case (median)")
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS / "partition_speed.json",
        help="where to write the JSON (the PNG goes beside it)",
    )
    args = parser.parse_args(argv)
    rows = run(args.quick, max(1, args.repeats))
    print(_table(rows))
    worst = run_worst(args.quick, max(1, args.repeats))
    print()
    print(_worst_table(worst))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "machine": platform.platform(),
    }
    data = {"meta": meta, "quick": args.quick, "rows": rows, "worst": worst}
    png = args.out.with_suffix(".png")
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    _plot(rows, png)
    print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
