"""How long does ``pipepart plan --auto`` take to search a 32-block GPT over up to 16 devices?

Question: does the configuration search (every schedule, every divisor of the global batch as
the micro-batch count, recompute, 1 to 16 devices; [Note: the configuration search] in
`partition.planning.auto`) finish in under 10 s here for the bundled GPT at 32 blocks (the 7b
width, sequence 2048, global batch 32) on H100s, by predicted step and by throughput per device?
And what does it choose?

Run:  python -m benchmarks.auto_search [--quick] [--out PATH]

Times are wall-clock seconds of each phase: the two traces the search interpolates between
(``trace``), the search itself (``search``), and the chosen plan (``plan``: its own trace and
split). ``--quick``: the toy GPT over up to 4 devices.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from partition import analyze, plan_analysis
from partition.devices import parse_devices
from partition.examples import gpt
from partition.options import PlanOptions
from partition.planning.auto import AutoOptions, search_configs
from partition.planning.search_space import devices_for, divisors, interpolated
from partition.units import format_size, format_time

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_S = 10.0


def run(quick: bool) -> dict[str, Any]:
    size, layers, seq, batch, spec, most = (
        ("toy", 4, None, 8, "mem=16GiB,tflops=0.001,bw=1TB/s,lat=0", 4)
        if quick
        else ("7b", 32, 2048, 32, "h100", 16)
    )
    with torch.device("meta"):
        model, inputs, _ = gpt(size, batch=batch, seq=seq, layers=layers)
    counts = divisors(batch)
    t0 = time.perf_counter()
    traced = {m: analyze(model, inputs, microbatches=m) for m in (counts[0], counts[-1])}
    trace_s = time.perf_counter() - t0
    lo, hi = traced[counts[0]], traced[counts[-1]]

    def analysis_for(m: int) -> Any:
        return interpolated(lo, hi, m) or analyze(model, inputs, microbatches=m)

    pool = parse_devices(spec, most)
    options = PlanOptions(objective="step")
    rows = []
    for objective in ("step", "throughput"):
        auto = AutoOptions(global_batch=batch, max_devices=most, objective=objective)
        t0 = time.perf_counter()
        result = search_configs(analysis_for, pool, options, auto)
        search_s = time.perf_counter() - t0
        best = result.ranked[0].candidate.config
        t0 = time.perf_counter()
        chosen = PlanOptions(
            objective="step",
            schedule=best.schedule,
            microbatches=best.microbatches,
            virtual=best.virtual,
        )
        analysis = traced.get(best.microbatches) or analyze(
            model, inputs, microbatches=best.microbatches
        )
        plan = plan_analysis(analysis, devices_for(pool, best.devices), chosen)
        plan_s = time.perf_counter() - t0
        rows.append(
            {
                "objective": objective,
                "nodes": len(lo.graph),
                "max_devices": most,
                "global_batch": batch,
                "searched": result.searched,
                "skipped": list(result.skipped),
                "trace_s": round(trace_s, 3),
                "search_s": round(search_s, 3),
                "plan_s": round(plan_s, 3),
                "chosen": best.describe(),
                "plan_step_s": plan.step_time,
                "top": [
                    {
                        "config": p.candidate.config.describe(),
                        "step_s": p.candidate.step_time,
                        "throughput": p.candidate.throughput,
                        "peak_memory": p.candidate.peak_memory,
                    }
                    for p in result.ranked[:6]
                ],
            }
        )
    return {"model": f"gpt {size}, {layers} blocks", "spec": spec, "rows": rows}


def _table(data: dict[str, Any]) -> str:
    lines = [f"{data['model']} on {data['spec']}"]
    for r in data["rows"]:
        verdict = "ok" if r["search_s"] < TARGET_S else "SLOW"
        lines.append(
            f"by {r['objective']}: {r['searched']} configurations priced in {r['search_s']:.2f} s "
            f"(target {TARGET_S:g} s: {verdict}); traces {r['trace_s']:.2f} s, plan "
            f"{r['plan_s']:.2f} s"
        )
        lines.append(
            f"  {'':>3} {'configuration':<40} {'step':>10} {'samples/s/dev':>14} {'peak':>10}"
        )
        for i, t in enumerate(r["top"]):
            lines.append(
                f"  {'*' if i == 0 else i + 1:>3} {t['config']:<40} {format_time(t['step_s']):>10} "
                f"{t['throughput']:>14,.4g} {format_size(t['peak_memory']):>10}"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the toy GPT over up to 4 devices")
    parser.add_argument("--out", type=Path, default=RESULTS / "auto_search.json")
    args = parser.parse_args(argv)
    data = run(args.quick)
    print(_table(data))
    data.update(
        question=__doc__.splitlines()[0],
        command="python -m benchmarks.auto_search" + (" --quick" if args.quick else ""),
        quick=args.quick,
        target_s=TARGET_S,
        machine={"python": sys.version.split()[0], "platform": platform.platform()},
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
