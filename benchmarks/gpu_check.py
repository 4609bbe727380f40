"""On one GPU: are a calibrated plan's per-stage times and memory what real kernels give?

Question: after `pipepart calibrate` has measured the device, does the cost model predict each
stage's forward + backward time and its peak memory (weights, gradients, AdamW state and the
activations its schedule keeps in flight) for GPT-2- and Llama-shaped models?

Run:  python -m benchmarks.gpu_check [--quick] [--device cuda|cpu] [--stages K] [--out PATH]
      pipepart bench gpu_check

On a machine without CUDA a full run writes ``{"skipped": ...}`` and exits 0; ``--quick`` (what
CI runs) and ``--device cpu`` make the same measurements on the CPU with tiny shapes, so that the
code stays tested (memory is then not measured: the CPU allocator keeps no peak). Under five minutes
on one H100. Each stage is built alone from the plan (`partition.split`), its weights drawn at
random on the device, and timed as the runtime runs it: forward of one micro-batch, backward
with ones as the outputs' gradients, medians of several runs after warm-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from partition.options import PlanOptions
from partition.planning.analysis import analyze
from partition.planning.model import plan_analysis
from partition.split import Stage, split
from pipeline.calibrate.machine import calibrate

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_check.json"

# (model name, size, batch, seq, micro-batches); the batch is split into the micro-batches.
MODELS = {
    "cuda": (("hf:gpt2", "real", 16, 1024, 4), ("hf:llama", "real", 4, 512, 4)),
    "cpu": (("hf:gpt2", "tiny", 8, 16, 4), ("hf:llama", "tiny", 8, 16, 4)),  # tiny: a smoke run
}


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _materialize(stage: Stage, device: torch.device) -> torch.nn.Module:
    """The stage on ``device`` with random weights (timing does not depend on their values)."""
    module = stage.module.to_empty(device=device)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point():
                tensor.normal_(0.0, 0.02)
            elif tensor.dtype == torch.bool:
                tensor.fill_(True)
            else:
                tensor.zero_()
    return module


def _inputs(stage: Stage, device: torch.device) -> list[torch.Tensor]:
    """One micro-batch of the stage's inputs: token ids are 0, activations are random."""
    out = []
    for spec in stage.inputs:
        dtype = spec.torch_dtype
        if dtype.is_floating_point:
            out.append(torch.randn(spec.shape, dtype=dtype, device=device, requires_grad=True))
        else:
            out.append(torch.zeros(spec.shape, dtype=dtype, device=device))
    return out


def _forward(module: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    outputs = tree_leaves(module(*inputs))
    return [t for t in outputs if isinstance(t, torch.Tensor) and t.requires_grad]


def _backward(outputs: list[torch.Tensor]) -> None:
    if outputs:
        torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])


def _time(module: torch.nn.Module, stage: Stage, device: torch.device, repeats: int) -> float:
    """Median seconds of one forward + backward of a micro-batch."""
    times = []
    for k in range(repeats + 2):  # two warm-ups
        inputs = _inputs(stage, device)
        _sync(device)
        start = time.perf_counter()
        _backward(_forward(module, inputs))
        _sync(device)
        if k >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak(module: torch.nn.Module, stage: Stage, device: torch.device, inflight: int) -> int:
    """Peak bytes of weights, gradients, AdamW state and ``inflight`` micro-batches' activations.

    The stage runs as a pipeline rank does at its peak: ``inflight`` forwards kept alive, then
    their backwards, then an optimizer step (which allocates AdamW's two moments).
    """
    module.zero_grad(set_to_none=True)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-6)
    torch.cuda.reset_peak_memory_stats(device)
    kept = [_forward(module, _inputs(stage, device)) for _ in range(inflight)]
    for outputs in kept:
        _backward(outputs)
    optimizer.step()
    del kept
    _sync(device)
    return int(torch.cuda.max_memory_allocated(device))


def check_model(
    name: str,
    size: str,
    batch: int,
    seq: int,
    microbatches: int,
    spec: Any,
    stages: int,
    device: torch.device,
    repeats: int,
) -> list[dict[str, Any]]:
    """Plan ``name`` over ``stages`` copies of the calibrated ``spec``; measure every stage."""
    from partition.models.registry import resolve

    _log(f"{name} ({size}): tracing on meta and planning {stages} stages")
    with torch.device("meta"):
        built = resolve(name, size=size, batch=batch, seq=seq).build()
    options = PlanOptions(microbatches=microbatches, schedule="1f1b")
    analysis = analyze(built.model, built.args or (), built.kwargs, options=options)
    plan = plan_analysis(analysis, [spec] * stages, options)
    bounds = [s.start for s in plan.stages] + [plan.stages[-1].stop]
    built_stages = split(analysis.traced, analysis.graph, bounds)
    rows = []
    for stage, planned in zip(built_stages, plan.stages, strict=True):
        _log(f"  stage {stage.index}: {planned.first_module} .. {planned.last_module}")
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        module = _materialize(stage, device)
        measured_s = _time(module, stage, device, repeats)
        peak = (
            _peak(module, stage, device, planned.inflight) - base if device.type == "cuda" else None
        )
        predicted_mem = planned.memory["total"]
        rows.append(
            {
                "model": f"{name} ({size})",
                "stage": stage.index,
                "modules": f"{planned.first_module} .. {planned.last_module}",
                "predicted_s": planned.compute_time,
                "measured_s": measured_s,
                "time_error": planned.compute_time / measured_s - 1.0,
                "predicted_bytes": predicted_mem,
                "measured_bytes": peak,
                "memory_error": None if peak is None else predicted_mem / peak - 1.0,
                "inflight": planned.inflight,
            }
        )
        del module, stage
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    head = "| model | stage | predicted ms | measured ms | time error | predicted MiB | measured MiB | memory error |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mib = r["measured_bytes"]
        lines.append(
            f"| {r['model']} | {r['stage']} | {r['predicted_s'] * 1e3:.2f} | "
            f"{r['measured_s'] * 1e3:.2f} | {r['time_error']:+.0%} | "
            f"{r['predicted_bytes'] / 2**20:.0f} | "
            f"{'-' if mib is None else f'{mib / 2**20:.0f}'} | "
            f"{'-' if r['memory_error'] is None else format(r['memory_error'], '+.0%')} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer repeats (and tiny shapes on cpu)"
    )
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default=None,
        help="default: cuda; without CUDA, --quick runs the cpu checks and a full run is skipped",
    )
    parser.add_argument("--stages", type=int, default=4, help="pipeline stages per model")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    base = {"question": __doc__.splitlines()[0], "command": "python -m benchmarks.gpu_check"}
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() or not args.quick else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        why = "no CUDA device on this machine (use --device cpu to run the same checks on the CPU)"
        print(f"gpu_check skipped: {why}")
        args.out.write_text(json.dumps({**base, "skipped": why, "rows": []}, indent=1))
        return 0
    device = torch.device(args.device)
    started = time.monotonic()
    _log(f"calibrating {device} (compute only: one device has no link to measure)")
    calibration = calibrate(args.device, link=False, progress=lambda line: _log(f"  {line}"))
    if device.type == "cpu":
        torch.set_num_threads(1)  # as each rank runs
    rows: list[dict[str, Any]] = []
    repeats = 3 if args.quick else 10
    for name, size, batch, seq, m in MODELS[device.type]:
        rows += check_model(
            name, size, batch, seq, m, calibration.device, args.stages, device, repeats
        )
    table = _table(rows)
    print(table)
    result = {
        **base,
        "quick": args.quick,
        "device": calibration.device.name,
        "machine": platform.node(),
        "torch": torch.__version__,
        "seconds": time.monotonic() - started,
        "spec": calibration.to_dict(),
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
