"""How long do tracing and costing take, and how much memory, for a big GPT on meta?

Question: does the bundled GPT (1b width: d=2048, 16 heads, seq 2048) at 12, 48 and 96 blocks
trace and cost on the ``meta`` device in seconds and without memory growing with its size?
Target: 96 blocks traced and costed in under 10 s on a 2-core machine.

Run:  python -m benchmarks.trace_cost [--quick] [--out PATH]

Each size runs in a fresh subprocess so its peak RSS is its own; the table reports wall-clock
seconds for tracing (symbolic trace + shape propagation on meta) and for costing (per-node FLOPs,
saved activations), the node count, the parameter count and the peak RSS growth over the
process's RSS after ``import torch``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_SECONDS = 10.0

_CHILD = """
import json, resource, sys, time, torch
from partition.models.examples import gpt
from partition.trace.fx import trace
from partition.cost import cost_model
from partition.graph import linearize
layers = int(sys.argv[1])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
with torch.device("meta"):
    model, inputs, _ = gpt("1b", batch=1, seq=2048, layers=layers)
traced = trace(model, inputs)
t1 = time.perf_counter()
costs = cost_model(traced)
graph = linearize(costs)
t2 = time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"blocks": layers, "nodes": len(graph), "params": costs.param_numel,
                  "trace_s": t1 - t0, "cost_s": t2 - t1, "total_s": t2 - t0,
                  "rss_growth_mib": (peak - base) / 1024}))
"""


def run(blocks: Sequence[int]) -> list[dict[str, Any]]:
    rows = []
    for layers in blocks:
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(layers)], capture_output=True, text=True, check=True
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="12 blocks only (CI smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS / "trace_cost.json")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.progress import track
    from rich.table import Table

    blocks = (12,) if args.quick else (12, 48, 96)
    rows = []
    for layers in track(blocks, description="tracing and costing", console=Console(stderr=True)):
        rows.extend(run([layers]))
    table = Table(title="trace + cost of the GPT (d=2048, seq 2048) on meta")
    for column in ("blocks", "nodes", "params", "trace s", "cost s", "total s", "peak RSS growth"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            str(r["blocks"]),
            f"{r['nodes']:,}",
            f"{r['params'] / 1e9:.2f} B",
            f"{r['trace_s']:.2f}",
            f"{r['cost_s']:.2f}",
            f"{r['total_s']:.2f}",
            f"{r['rss_growth_mib']:.0f} MiB",
        )
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"target_seconds_96_blocks": TARGET_SECONDS, "rows": rows}, indent=2) + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
