"""Replicas × pipeline: what does a step of the bundled GPT cost on 4 gloo ranks as pp=2 × dp=2,
as pp=4 × dp=1 and as pp=1 × dp=4, against torch's own DistributedDataParallel on the whole
model (the anchor), with the gradient reduction over replicas started as each stage's last
backward ends ("stage") or in one bulk after the schedule ("end")?

Run:  python -m benchmarks.data_parallel [--quick] [--rounds N] [--out PATH]

How it is fair:

* Same work. One global batch of 16 sequences per optimizer step, the same initial weights
  (the factory's, seed 0), Adam; each replica trains on its shard (`pipeline.parallel.data`),
  micro-batches of 2 sequences in a pipeline (pp=1 runs its shard as one micro-batch, as DDP
  does). The first step's global loss of every row is reported: they agree to fp32 rounding.
* Time: one spawn of 4 gloo ranks (one thread each) builds every row's pipeline (each on its
  own mesh) and the DDP model; each round runs every row for a few steps, the order rotating
  round by round, each step after a barrier; a step's time is its slowest rank's wall time.
  Reported: the median over all timed steps, the ratio to the DDP anchor's, and for "stage"
  rows the median over rounds of the ratio to the same pipeline reducing at the end.
* Memory: one more spawn per row, that row alone in fresh processes, weights from the init
  rules (so that no rank builds the whole model to copy from); the largest rank's peak RSS
  (``VmHWM``) growth over its RSS before the build, after 3 steps (glibc's mmap threshold
  pinned, as in `benchmarks.dp_memory`, so that freed tensors leave the RSS).
* Predicted: the schedule simulated (`partition.schedules.simulate`) from this row's own
  median F and B times per stage and the link's cost per boundary tensor, plus the part of the
  reduction over replicas the backward does not hide (`partition.planning.replicas`), the link
  measured in the same spawn (an all-reduce of 4 bytes and of 16 MiB between two ranks, fitted
  to the ring model). The optimizer step and the non-finite check are not priced. Memory: the
  plan's per-stage memory under DDP (`partition.memory.replicated_memory`), summed per rank.
* FSDP rows (``dp_reduce="fsdp"``, [Note: FSDP under a pipeline]): the same work, stages
  sharded over the replicas; predicted with the same ring cost, since a reduce-scatter and an
  all-gather move the bytes of one all-reduce (the all-gather at the step's first forward is not
  placed on the timeline), and their memory under FSDP's rule.

The machine has 2 cores: 4 ranks oversubscribe it, so every row's compute is slower than on 4
cores and the rows compare with each other, not with a real cluster's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from benchmarks import _workloads
from partition.memory import replicated_memory
from partition.planning.replicas import predict_reduction
from partition.schedules.simulate import simulate

RESULTS = Path(__file__).resolve().parent / "results" / "data_parallel.json"
GLOBAL_ROWS, ROWS = 16, 2  # sequences per optimizer step, per micro-batch


@dataclass(frozen=True)
class Row:
    """One way to run the 4 ranks."""

    name: str
    pp: int
    dp: int
    when: str = "stage"
    virtual: int = 1
    ddp: bool = False  # torch's DistributedDataParallel on the whole model
    reduce: str = "ddp"  # pipepart's dp_reduce: "ddp" (replicated) or "fsdp" (sharded)

    @property
    def microbatches(self) -> int:
        return 1 if self.pp == 1 else GLOBAL_ROWS // (self.dp * ROWS)

    @property
    def schedule(self) -> str:
        return "interleaved" if self.virtual > 1 else "1f1b"


ROWS_ALL = [
    Row("pp=2 x dp=2, reduce as stages end", 2, 2, "stage"),
    Row("pp=2 x dp=2, reduce at the end", 2, 2, "end"),
    Row("pp=2 x dp=2 interleaved, as stages end", 2, 2, "stage", virtual=2),
    Row("pp=2 x dp=2 interleaved, at the end", 2, 2, "end", virtual=2),
    Row("pp=4 x dp=1", 4, 1),
    Row("pp=1 x dp=4 (pipepart)", 1, 4),
    Row("pp=1 x dp=4 (torch DDP, anchor)", 1, 4, ddp=True),
    Row("pp=2 x dp=2 fsdp, as stages end", 2, 2, "stage", reduce="fsdp"),
    Row("pp=1 x dp=4 fsdp", 1, 4, reduce="fsdp"),
]


def _workload(row: Row, quick: bool) -> _workloads.Workload:
    """The bundled GPT (`partition.models.examples.gpt`) sized for a replica's batch."""
    layers, width = (4, 64) if quick else (4, 256)
    rows = GLOBAL_ROWS // row.dp if row.pp == 1 else ROWS
    return _workloads.gpt(row.microbatches, layers=layers, rows=rows, width=width)


def _build(row: Row, quick: bool, weights: str = "auto") -> Any:
    from pipeline.runtime.pipeline import Pipeline, PipelineOptions

    work = _workload(row, quick)
    if row.ddp:
        torch.manual_seed(0)
        built = work()
        model = torch.nn.parallel.DistributedDataParallel(built.model)
        return model, torch.optim.Adam(model.parameters(), lr=1e-4), built.loss_fn
    options = PipelineOptions(
        schedule=row.schedule,
        microbatches=row.microbatches,
        virtual=row.virtual,
        dp=row.dp,
        dp_reduce=row.reduce,  # type: ignore[arg-type]
        weights=weights,  # type: ignore[arg-type]
    )
    pipe = Pipeline(work, options=options, optimizer_factory=lambda p: torch.optim.Adam(p, lr=1e-4))
    pipe.sync.when = row.when  # type: ignore[assignment]
    return pipe


def _step(row: Row, built: Any, batch: Any) -> float | None:
    """One optimizer step of ``row`` on the global ``batch``; the global loss on some rank."""
    from pipeline.parallel.data import global_loss, shard

    replica = dist.get_rank() // row.pp
    (x,), y = batch
    x, y = shard((x, y), replica, row.dp)
    if row.ddp:
        model, optimizer, loss_fn = built
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        total = loss.detach().double().clone()
        dist.all_reduce(total)
        return float(total) / row.dp
    loss = global_loss(built, [built.step(x, y)])
    return None if loss is None else float(loss)


def _link(repeats: int) -> tuple[float, float]:
    """``(latency, bandwidth)`` of the ring model, fitted to 2-rank all-reduces of 4 bytes and
    16 MiB: ``t(n) = n / bandwidth + 2 latency``."""
    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    group = groups[dist.get_rank() % 2]
    times = []
    for numel in (1, 4 * 2**20):
        t = torch.zeros(numel)
        samples = []
        for _ in range(repeats):
            dist.barrier()
            began = time.perf_counter()
            dist.all_reduce(t, group=group)
            samples.append(time.perf_counter() - began)
        times.append(statistics.median(samples))
    return times[0] / 2, 16 * 2**20 / max(times[1] - times[0], 1e-9)


def _times(pipe: Any) -> dict[int, tuple[float, float]]:
    """This rank's stages' F and B times (seconds, medians over the last step's micro-batches)."""
    out = {}
    for s in pipe.my_stages:
        got = {k: [e - b for _, a, b, e in pipe.timeline if a.stage == s and a.kind.name == k]
               for k in ("F", "B")}  # fmt: skip
        out[s] = (statistics.median(got["F"]), statistics.median(got["B"]))
    return out


def _predict(row: Row, pipe: Any, stage_times: dict[int, tuple[float, float]], link: Any) -> float:
    """The step the models predict from this row's own compute times; see the module's note."""
    latency, bandwidth = link
    plan = pipe.plan
    stages = tuple(
        dataclasses.replace(
            s, device=dataclasses.replace(s.device, bandwidth=bandwidth, latency=latency)
        )
        for s in plan.stages
    )
    plan = dataclasses.replace(plan, stages=stages)
    n = len(stages)
    sim = simulate(
        pipe.schedule,
        forward_time=[stage_times[s][0] for s in range(n)],
        backward_time=[stage_times[s][1] for s in range(n)],
        comm_time=[latency + s.send_bytes / bandwidth for s in stages[:-1]],
    )
    when = "end" if row.ddp else row.when  # DDP's bucket-by-bucket overlap is not modelled
    reduce = predict_reduction(plan, row.dp, when=when, simulated=sim)  # type: ignore[arg-type]
    return sim.step_time + reduce.exposed


def _timed(rows: list[Row], quick: bool, rounds: int, steps: int) -> dict[str, Any]:
    """On every rank: every row built, rounds of interleaved steps; the results on rank 0."""
    torch.set_num_threads(1)
    link = _link(3 if quick else 10)
    built = [_build(row, quick) for row in rows]
    batch = _workloads.batch(_workload(Row("", 1, 1), quick), seed=1)  # the global batch
    first = [_step(row, b, batch) for row, b in zip(rows, built, strict=True)]  # warm-up
    samples: list[list[float]] = [[] for _ in rows]
    for r in range(rounds):
        for k in [(i + r) % len(rows) for i in range(len(rows))]:
            for _ in range(steps):
                dist.barrier()
                began = time.perf_counter()
                _step(rows[k], built[k], batch)
                took = torch.tensor(time.perf_counter() - began)
                dist.all_reduce(took, op=dist.ReduceOp.MAX)
                samples[k].append(float(took))
    pipes = {k: b for k, b in enumerate(built) if not rows[k].ddp}
    mine = {k: _times(p) for k, p in pipes.items()}
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (mine, first))
    if dist.get_rank() != 0:
        return {}
    out = []
    anchor = next(k for k, row in enumerate(rows) if row.ddp)
    for k, row in enumerate(rows):
        source = (
            k if not row.ddp else next(j for j, r in enumerate(rows) if r.pp == 1 and not r.ddp)
        )
        times = {s: t for got, _ in gathered for s, t in got[source].items()}
        losses = [g[1][k] for g in gathered if g[1][k] is not None]
        out.append({
            "row": row.name, "pp": row.pp, "dp": row.dp, "when": row.when, "virtual": row.virtual,
            "runtime": "torch-ddp" if row.ddp else "pipepart", "microbatches": row.microbatches,
            "dp_reduce": "torch-ddp" if row.ddp else row.reduce,
            "step_s": statistics.median(samples[k]),
            "steps_timed": len(samples[k]),
            "vs_ddp": statistics.median(samples[k]) / statistics.median(samples[anchor]),
            "predicted_s": _predict(row, pipes[source], times, link),
            "loss": losses[0] if losses else None,
        })  # fmt: skip
    for k, row in enumerate(rows):  # paired by round: robust to the load drifting
        same = [
            j
            for j, r in enumerate(rows)
            if (r.pp, r.dp, r.virtual, r.reduce) == (row.pp, row.dp, row.virtual, row.reduce)
        ]
        twin = next((j for j in same if rows[j].when == "end" and not rows[j].ddp), None)
        if row.when == "stage" and not row.ddp and twin is not None:
            ratios = [statistics.median(samples[k][i : i + steps])
                      / statistics.median(samples[twin][i : i + steps])
                      for i in range(0, len(samples[k]), steps)]  # fmt: skip
            out[k]["stage_vs_end"] = statistics.median(ratios)
    return {"rows": out, "link": {"latency_s": link[0], "bandwidth_Bps": link[1]}}


def _memory(row: Row, quick: bool) -> dict[str, float]:
    """On every rank of a fresh spawn: peak RSS growth over 3 steps of ``row`` alone, and the
    plan's prediction for this rank; the largest rank's on rank 0."""
    torch.set_num_threads(1)
    before, _ = _workloads.rss_mib()
    built = _build(row, quick, weights="init")
    batch = _workloads.batch(_workload(Row("", 1, 1), quick), seed=1)
    for _ in range(3):
        _step(row, built, batch)
    _, peak = _workloads.rss_mib()
    predicted = 0.0
    if not row.ddp:
        for s in built.my_stages:
            stage = built.plan.stages[s]
            predicted += replicated_memory(stage.memory, stage.param_bytes, row.dp, row.reduce)
    mine = torch.tensor([peak - before, predicted / 2**20])
    gathered = [torch.zeros(2) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    worst = max(gathered, key=lambda t: float(t[0]))
    return {"peak_rss_growth_mib": float(worst[0]), "predicted_mib": float(worst[1])}


def _spawn(fn: Any, *args: Any) -> Any:
    from pipeline.launch.spawn import spawn_ranks

    outcomes = spawn_ranks(fn, 4, args, timeout=600, backend="gloo", start_method="forkserver")
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise RuntimeError("\n".join(f"{o.describe()}\n{o.traceback}" for o in failed))
    return outcomes[0].value


def _table(rows: list[dict[str, Any]]) -> str:
    head = ("row", "step ms", "vs DDP", "stage/end", "predicted ms", "peak MiB", "predicted MiB",
            "loss")  # fmt: skip
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        loss = "" if r["loss"] is None else f"{r['loss']:.5f}"
        lines.append(" | ".join([
            r["row"], f"{r['step_s'] * 1e3:.1f}", f"{r['vs_ddp']:.2f}",
            f"{r['stage_vs_end']:.2f}" if "stage_vs_end" in r else "",
            f"{r['predicted_s'] * 1e3:.1f}", f"{r['peak_rss_growth_mib']:.0f}",
            f"{r['predicted_mib']:.0f}", loss,
        ]))  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny GPT, a few steps")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON to write")
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 10)  # 30 timed steps a row
    steps = 1 if args.quick else 3
    load = os.getloadavg()
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # freed tensors leave the RSS
    timed = _spawn(_timed, ROWS_ALL, args.quick, rounds, steps)
    memory: dict[str, dict[str, float]] = {}
    for row in ROWS_ALL:  # "end" differs from "stage" in time only
        twin = next((r for r in ROWS_ALL if r.pp == row.pp and r.virtual == row.virtual
                     and r.ddp == row.ddp and r.reduce == row.reduce
                     and r.name in memory), None)  # fmt: skip
        memory[row.name] = memory[twin.name] if twin else _spawn(_memory, row, args.quick)
    rows = [{**r, **memory[r["row"]]} for r in timed["rows"]]
    plain = next(r for r in rows if r["pp"] == 1 and r["runtime"] == "pipepart")
    for r in rows:  # DDP's buckets are the copy of the gradients the ddp column counts
        r["predicted_mib"] = r["predicted_mib"] or plain["predicted_mib"]
    data = {
        "question": __doc__.splitlines()[0],
        "command": "python -m benchmarks.data_parallel" + (" --quick" if args.quick else ""),
        "quick": args.quick,
        "machine": _workloads.machine(load),
        "workload": _workload(ROWS_ALL[0], args.quick).describe(),
        "global_rows": GLOBAL_ROWS,
        "link": timed["link"],
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"{data['workload']}, {GLOBAL_ROWS} sequences per step, 4 gloo ranks")
    print(_table(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
