"""How much memory does sharding save per rank: replicas under DDP against FSDP, measured
beside what ``pipepart plan --dp`` predicts.

Question: with 4 gloo ranks as pp=2 × dp=2 and as pp=1 × dp=4, training the bundled GPT with
AdamW, what is each rank's peak memory under ``--dp-reduce ddp`` (replicated weights, gradients
all-reduced from a flat copy) and under ``--dp-reduce fsdp`` (``fully_shard`` over dp: gradients
and optimizer state sharded, the weights and gradients gathered during a step), and how far is
it from `partition.memory.replicated_memory`'s prediction (the ``plan --dp`` table)?

Run:  python -m benchmarks.dp_memory [--quick] [--steps N] [--out PATH]

Each configuration runs in its own 4 processes. A rank reads its resident set (``VmRSS``) after
the process group is up and before the pipeline is built, then builds it (``weights="init"``:
each rank initialises only its own tensors, no factory model), trains ``--steps`` steps and reads
its peak (``VmHWM``): the growth between them is the rank's measured memory, compared with the
prediction for its stage under the plan the pipeline made (AdamW's memory model, the run's
schedule and micro-batches). glibc's mmap threshold is pinned (``MALLOC_MMAP_THRESHOLD_``) so
that freed tensors leave the resident set; what remains is the interpreter's own growth (tracing,
planning, gloo's buffers), so small models read high. Memory does not depend on the machine's
load, so configurations run once each.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks._workloads import machine, rss_mib
from partition.memory import MemoryModel, replicated_memory
from partition.models import examples
from partition.options import PlanOptions
from pipeline.launch.spawn import spawn_ranks
from pipeline.parallel.data import shard
from pipeline.runtime.pipeline import Pipeline, PipelineOptions

RESULTS = Path(__file__).resolve().parent / "results" / "dp_memory.json"
CONFIGS = [(2, 2, "ddp"), (2, 2, "fsdp"), (1, 4, "ddp"), (1, 4, "fsdp")]
"""``(pp, dp, reduction)`` of each run."""
_MIB = 2**20


def model(size: str, layers: int, seq: int, batch: int) -> Any:
    """The bundled GPT of ``size`` with ``layers`` blocks, a batch of ``batch`` sequences."""
    return examples.gpt(size, layers=layers, seq=seq, batch=batch)


def _rank(factory: Any, pp: int, dp: int, reduction: str, m: int, steps: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    start = rss_mib()[0]
    options = PipelineOptions(
        schedule="1f1b",
        microbatches=m,
        dp=dp,
        dp_reduce=reduction,  # type: ignore[arg-type]
        weights="init",
        planning=PlanOptions(memory=MemoryModel(optimizer="adamw")),
    )
    pipe = Pipeline(
        factory, options=options, optimizer_factory=functools.partial(torch.optim.AdamW, lr=1e-4)
    )
    built = rss_mib()[0]
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        gpt, (idx,), _ = factory()  # the batch's shape and the vocabulary only
    vocab = gpt.config.vocab_size
    began = time.monotonic()
    for _ in range(steps):
        x = torch.randint(0, vocab, (idx.shape[0] * dp, idx.shape[1]), generator=g)
        pipe.step(*shard((x, x), pipe.replica, dp))
    seconds = (time.monotonic() - began) / steps
    peak = rss_mib()[1]
    assert pipe.plan is not None
    stages = [pipe.plan.stages[s] for s in pipe.my_stages]
    predicted = sum(replicated_memory(s.memory, s.param_bytes, dp, reduction) for s in stages)
    one = sum(s.memory["total"] for s in stages)
    return {
        "stages": list(pipe.my_stages),
        "weights_mib": sum(s.param_bytes for s in stages) / _MIB,
        "built_mib": built - start,
        "peak_mib": peak - start,
        "predicted_mib": predicted / _MIB,
        "one_pipeline_mib": one / _MIB,
        "step_s": seconds,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the toy GPT, 1 step, pp=2 × dp=2")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 3)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    size, layers, seq, m = ("toy", 4, 16, 4) if args.quick else ("small", 4, 64, 4)
    steps = args.steps or (1 if args.quick else 3)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # before the ranks start
    rows = []
    for pp, dp, reduction in CONFIGS[:2] if args.quick else CONFIGS:
        factory = functools.partial(model, size, layers, seq, m)  # one row per micro-batch
        outcomes = spawn_ranks(
            _rank, pp * dp, (factory, pp, dp, reduction, m, steps), timeout=1800, pg_timeout=600
        )
        failed = [o for o in outcomes if not o.ok]
        if failed:
            for o in failed:
                print(o.describe(), o.traceback, file=sys.stderr)
            return 1
        for rank, o in enumerate(outcomes):
            r = o.value
            rows.append(
                {
                    "pp": pp,
                    "dp": dp,
                    "reduction": reduction,
                    "rank": rank,
                    **r,
                    "ratio": r["peak_mib"] / r["predicted_mib"],
                }
            )
    _print(rows)
    out = {
        "question": "peak memory per rank, DDP vs FSDP replicas of the bundled GPT, measured vs "
        "plan --dp's prediction",
        "command": "python -m benchmarks.dp_memory" + (" --quick" if args.quick else ""),
        "quick": args.quick,
        "model": f"GPT {size}, {layers} blocks, {m} micro-batches of 1 x {seq} tokens, AdamW",
        "machine": machine(os.getloadavg()),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


def _print(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'pp×dp':>6} {'reduce':>6} {'rank':>4} {'stage':>5} {'weights':>8} {'measured':>9} "
        f"{'predicted':>9} {'ratio':>6} {'1 pipeline':>10}"
    )
    for r in rows:
        print(
            f"{r['pp']}×{r['dp']:<4} {r['reduction']:>6} {r['rank']:>4} "
            f"{','.join(map(str, r['stages'])):>5} {r['weights_mib']:>7.0f}M {r['peak_mib']:>8.0f}M "
            f"{r['predicted_mib']:>8.0f}M {r['ratio']:>6.2f} {r['one_pipeline_mib']:>9.0f}M"
        )


if __name__ == "__main__":
    raise SystemExit(main())
