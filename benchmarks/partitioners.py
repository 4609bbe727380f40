"""How much better is the optimal split than the splits other pipeline libraries make?

Question: on a Llama-style model (embedding, 32 blocks, LM head; transformers' ``LlamaForCausalLM``
at the Llama-2-7B shape, traced on meta) over 8 and 16 devices with 1F1B, how close is each
partitioner's slowest stage to perfect balance, what step time does the simulator predict, and
does the plan fit memory? And the same for heterogeneous device speeds and for tight memory.

Run:  python -m benchmarks.partitioners [--quick] [--out PATH]

Partitioners, all scored by one objective (`partition.algorithms.objective`):

* ``optimal`` — pipepart's exact node-level bottleneck search, memory- and communication-aware;
* ``optimal, no comm term`` — the same search with free links, then priced with the real ones
  (shows why cutting inside a block must be priced by the communication term);
* ``best layer-level`` — the optimum restricted to cuts between blocks;
* ``uniform layers`` — Megatron's default: equal blocks per stage, embedding first, head last;
* ``params`` — DeepSpeed's ``partition_method="parameters"``;
* ``time`` — torchgpipe's ``balance_by_time`` block partition;
* ``uniform nodes`` — equal node counts.

``--quick`` runs a GPT-2-small-shaped model instead (CI smoke run, well under a minute).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from partition import Analysis, analyze
from partition.algorithms.problem import Problem
from partition.devices import Device, parse_devices
from partition.errors import InfeasibleError, PlanError
from partition.graph import FloatArray, LinearGraph
from partition.memory import MemoryModel
from partition.models.registry import resolve
from partition.planning.predict import predict_step
from partition.solve import Solution, evaluate, solve

RESULTS = Path(__file__).resolve().parent / "results"
MEMORY = MemoryModel(optimizer="adam", master_weights=True)


# --- layer level: where a layer-level partitioner may cut ---------------------------------------

_LAYER = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def layer_of(module_path: str) -> str | None:
    """The repeated layer a module path belongs to (``"model.layers.3"`` of
    ``"model.layers.3.mlp.up_proj"``), or None outside any numbered layer."""
    match = _LAYER.match(module_path)
    return match.group(1) if match else None


def layer_boundaries(graph: LinearGraph) -> list[int]:
    """The cut positions that fall between layers: where a layer-level partitioner may cut.

    A node outside every numbered layer (embedding, final norm, head, a residual add at the root)
    stays with the layer before it, or with the first layer if none came yet. Position ``0`` and
    ``len(graph)`` are included.
    """
    cuts = [0]
    current: str | None = None
    seen_layer = False
    for i, path in enumerate(graph.module_paths):
        layer = layer_of(path)
        if layer is None:
            continue
        if seen_layer and layer != current:
            cuts.append(i)
        seen_layer, current = True, layer
    if cuts[-1] != len(graph):
        cuts.append(len(graph))
    return cuts


def coarsen(graph: LinearGraph, boundaries: list[int]) -> LinearGraph:
    """One node per group ``[boundaries[g], boundaries[g+1])``: sums of costs, cuts at the bounds."""
    b = np.asarray(boundaries, dtype=np.int64)
    if b[0] != 0 or b[-1] != len(graph) or np.any(np.diff(b) <= 0):
        raise PlanError(f"boundaries must rise from 0 to {len(graph)}")

    def sums(values: FloatArray) -> FloatArray:
        return np.add.reduceat(values, b[:-1])

    return LinearGraph(
        names=tuple(graph.names[i] for i in b[:-1]),
        module_paths=tuple(graph.module_paths[i] for i in b[:-1]),
        compute=sums(graph.compute),
        forward=sums(graph.forward),
        param_bytes=sums(graph.param_bytes),
        saved_bytes=sums(graph.saved_bytes),
        cut_bytes=graph.cut_bytes[b],
        param_element_size=graph.param_element_size,
        extra={**graph.extra, "coarsened_from": len(graph)},
    )


def _uniform_layers(graph: LinearGraph, k: int) -> tuple[int, ...]:
    """Megatron: equal numbers of blocks per stage; what precedes block 0 goes first, the head last."""
    cuts = layer_boundaries(graph)
    blocks = len(cuts) - 1
    if blocks < k:
        raise InfeasibleError(f"{blocks} layers cannot fill {k} stages")
    per = [blocks // k + (1 if s < blocks % k else 0) for s in range(k)]
    bounds, at = [0], 0
    for count in per[:-1]:
        at += count
        bounds.append(cuts[at])
    return (*bounds, len(graph))


def _score(problem: Problem, bounds: Sequence[int], stages_time: Any = None) -> dict[str, Any]:
    evaluation = evaluate(problem, bounds)
    from partition.plan import StagePlan

    stages = [
        StagePlan(
            index=s,
            device=problem.stage_device(s),
            start=bounds[s],
            stop=bounds[s + 1],
            first_node="",
            last_node="",
            first_module="",
            last_module="",
            flops=float(problem.graph.compute[bounds[s] : bounds[s + 1]].sum()),
            forward_flops=float(problem.graph.forward[bounds[s] : bounds[s + 1]].sum()),
            param_bytes=0,
            memory={},
            capacity=0,
            compute_time=evaluation.stage_compute_times[s],
            comm_time=evaluation.stage_comm_times[s],
            send_bytes=float(problem.graph.cut_bytes[bounds[s + 1]])
            if s + 1 < len(bounds) - 1
            else 0.0,
        )
        for s in range(len(bounds) - 1)
    ]
    step, bubble = predict_step(problem.schedule, problem.virtual, problem.microbatches, stages)
    return {
        "bottleneck_ms": evaluation.bottleneck * 1e3,
        "vs_perfect": evaluation.balance_ratio,
        "step_ms": step * 1e3,
        "bubble": bubble,
        "fits": evaluation.fits,
        "peak_memory_of_cap": evaluation.peak_memory,
        "comm_mb": evaluation.comm_bytes / 1e6,
        "bounds": list(bounds),
    }


def compare(
    analysis: Analysis, devices: list[Device], microbatches: int
) -> dict[str, dict[str, Any]]:
    graph = analysis.graph
    k = len(devices)
    problem = Problem(
        graph=graph,
        devices=tuple(devices),
        schedule="1f1b",
        microbatches=microbatches,
        memory=MEMORY,
    )
    rows: dict[str, dict[str, Any]] = {}

    def attempt(name: str, make: Any) -> None:
        try:
            rows[name] = _score(problem, make())
        except InfeasibleError as e:
            rows[name] = {"error": str(e).splitlines()[0][:160]}

    def optimal() -> tuple[int, ...]:
        return solve(graph, devices, microbatches=microbatches, memory=MEMORY).bounds

    def free_links() -> tuple[int, ...]:
        fast = [replace(d, bandwidth=1e30, latency=0.0) for d in devices]
        return solve(graph, fast, microbatches=microbatches, memory=MEMORY).bounds

    def layer_level() -> tuple[int, ...]:
        cuts = layer_boundaries(graph)
        coarse: Solution = solve(
            coarsen(graph, cuts), devices, microbatches=microbatches, memory=MEMORY
        )
        return tuple(cuts[i] for i in coarse.bounds)

    attempt("optimal", optimal)
    attempt("optimal, no comm term", free_links)
    attempt("best layer-level", layer_level)
    attempt("uniform layers (Megatron)", lambda: _uniform_layers(graph, k))
    for algorithm, label in (
        ("params", "params (DeepSpeed)"),
        ("time", "time (torchgpipe)"),
        ("uniform", "uniform nodes"),
    ):
        attempt(
            label,
            lambda a=algorithm: (
                solve(graph, devices, microbatches=microbatches, memory=MEMORY, algorithm=a).bounds
            ),
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="a GPT-2-small-shaped model (CI smoke run)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "partitioners.json")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    if args.quick:
        spec, seqs, counts = resolve("gpt", size="small", batch=8, seq=1024), (1024,), (4, 8)
        hetero = "h100;h100;h100;a100-40;a100-40;a100-40;a100-40;a100-40"
        device = "mem=80GB,tflops=400,bw=50GB/s"
    else:
        spec, seqs, counts = (
            resolve("hf:llama", size="real", batch=8, seq=4096),
            (4096, 16384),
            (8, 16),
        )
        hetero = "h100;h100;h100;h100;a100-80;a100-80;a100-80;a100-80"
        device = "mem=80GB,tflops=400,bw=50GB/s"
    results: list[dict[str, Any]] = []
    for seq in seqs:
        spec = replace(spec, seq=seq)
        with torch.device("meta"), console.status(f"tracing {spec.name} at seq {seq} on meta"):
            model, inputs, kwargs, _, _ = spec.build()
            if not args.quick:
                model = model.to(torch.bfloat16)
            analysis = analyze(model, inputs, kwargs, microbatches=8)
        cases = [(f"{k} × {device}", parse_devices(device, k)) for k in counts]
        if seq == seqs[0]:
            cases.append((f"heterogeneous: {hetero}", parse_devices(hetero)))
        for label, devices in cases:
            rows = compare(analysis, devices, microbatches=8)
            results.append(
                {
                    "model": spec.name,
                    "size": spec.size,
                    "seq": seq,
                    "devices": label,
                    "nodes": len(analysis.graph),
                    "rows": rows,
                }
            )
            table = Table(
                title=f"{spec.name} {spec.size or ''} seq {seq}, {len(analysis.graph)} nodes · {label} · 1F1B, 8 micro-batches, Adam + fp32 master"
            )
            for column in (
                "partitioner",
                "slowest stage",
                "× perfect balance",
                "predicted step",
                "bubble",
                "fits memory",
                "peak mem / cap",
                "cut MB",
            ):
                table.add_column(column, justify="left" if column == "partitioner" else "right")
            best = rows["optimal"].get("step_ms")
            for name, row in rows.items():
                if "error" in row:
                    table.add_row(name, row["error"], "", "", "", "no", "", "")
                    continue
                ratio = f" ({row['step_ms'] / best:.2f}×)" if best else ""
                table.add_row(
                    name,
                    f"{row['bottleneck_ms']:.2f} ms",
                    f"{row['vs_perfect']:.3f}",
                    f"{row['step_ms']:.1f} ms{ratio}",
                    f"{row['bubble']:.1%}",
                    "yes" if row["fits"] else "[red]no[/red]",
                    f"{row['peak_memory_of_cap']:.2f}",
                    f"{row['comm_mb']:.1f}",
                )
            console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
