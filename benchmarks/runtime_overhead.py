"""How close does the runtime come to the ideal step time of its schedule?

Question: with each stage's forward and backward times measured in the run itself, how much
longer is a measured training step than the schedule's ideal (the simulator's step time for those
compute times and free communication)? Goal: within 10 %.

Run:  python -m benchmarks.runtime_overhead [--quick] [--ranks N] [--steps S] [--out PATH]

Each schedule runs on the same spawned gloo ranks (one thread each, so use at most as many ranks
as cores). Per stage, the median duration of its F, B, I and W actions in a step gives the
compute times that step's ideal is simulated with. Each measured step (the slowest rank's
``Pipeline.step`` wall time, which also includes sending, waiting, the end-of-step flush and the
optimizer step) is compared with its own ideal, so that a step slowed by another process on the
machine meets an ideal slowed alike; the overhead is the median over steps. The per-action
timelines are saved in the JSON, for Gantt charts (``partition.schedules.gantt.plot_gantt``, drawn beside
it) and for comparisons with other runtimes. On a shared machine, compare rows from one run only.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from partition.models import examples
from partition.schedules.actions import Action, Kind, build_schedule
from partition.schedules.simulate import simulate
from pipeline.launch.spawn import spawn_ranks
from pipeline.runtime.pipeline import Pipeline, PipelineOptions

RESULTS = Path(__file__).resolve().parent / "results" / "runtime_overhead.json"
GOAL = 0.10
SCHEDULES = (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb-h1", 1))


def model(width: int, layers: int, seq: int, batch: int) -> Any:
    """A GPT whose blocks dominate its time (small vocabulary), sized by the arguments."""
    config = examples.GPTConfig(
        vocab_size=512, block_size=seq, n_layer=layers, n_head=4, n_embd=width
    )
    return examples.gpt(config, batch=batch, seq=seq)


def _rank(factory: Any, microbatches: int, warmup: int, steps: int) -> list[dict[str, Any]]:
    out = []
    for name, virtual in SCHEDULES:
        options = PipelineOptions(schedule=name, microbatches=microbatches, virtual=virtual)
        pipe = Pipeline(
            factory, options=options, optimizer_factory=functools.partial(torch.optim.SGD, lr=1e-3)
        )
        g = torch.Generator().manual_seed(0)
        x = torch.randint(
            0,
            512,
            (pipe.input_specs[0].shape[0] * microbatches, pipe.input_specs[0].shape[1]),
            generator=g,
        )
        times, timelines = [], []
        for k in range(warmup + steps):
            torch.distributed.barrier()
            start = time.monotonic()
            pipe.step(x, x)
            if k >= warmup:
                times.append(time.monotonic() - start)
                timelines.append([(r, str(a), s, e) for r, a, s, e in pipe.timeline])
        out.append({"schedule": name, "virtual": virtual, "times": times, "timelines": timelines})
        torch.distributed.barrier()
    return out


def _stage_times(
    timelines: list[list[tuple[int, str, float, float]]], num_stages: int
) -> dict[str, list[float]]:
    """Median duration of each compute kind per stage."""
    durations: dict[tuple[str, int], list[float]] = defaultdict(list)
    for timeline in timelines:
        for _, text, start, end in timeline:
            action = Action.parse(text)
            if action.kind in (Kind.F, Kind.B, Kind.I, Kind.W):
                durations[action.kind.value, action.stage].append(end - start)
    return {
        kind: [
            statistics.median(durations[kind, s]) if durations[kind, s] else 0.0
            for s in range(num_stages)
        ]
        for kind in "FBIW"
    }


def _ideal(schedule: Any, times: dict[str, list[float]]) -> Any:
    if schedule.name == "zb-h1":
        backward = [i + w for i, w in zip(times["I"], times["W"], strict=True)]
        return simulate(
            schedule, forward_time=times["F"], backward_time=backward, weight_time=times["W"]
        )
    return simulate(schedule, forward_time=times["F"], backward_time=times["B"])


def _analyse(result: dict[str, Any], ranks: int, microbatches: int) -> dict[str, Any]:
    """Each step against its own ideal (so a step slowed by a neighbour on the machine is
    compared with an ideal slowed alike), then medians over steps."""
    name, virtual = result["schedule"], result["virtual"]
    schedule = build_schedule(name, ranks, microbatches, virtual)
    ideals = [
        _ideal(schedule, _stage_times([tl], schedule.num_stages)).step_time
        for tl in result["timelines"]
    ]
    ratios = [m / i for m, i in zip(result["times"], ideals, strict=True)]
    times = _stage_times(result["timelines"], schedule.num_stages)
    ideal = _ideal(schedule, times)
    sends = [e - s for tl in result["timelines"] for _, a, s, e in tl if a[1:3] in ("SF", "SB")]
    return {
        "schedule": name,
        "virtual": virtual,
        "measured_step_s": statistics.median(result["times"]),
        "ideal_step_s": statistics.median(ideals),
        "overhead": statistics.median(ratios) - 1.0,
        "overhead_per_step": [r - 1.0 for r in ratios],
        "ideal_bubble": ideal.bubble_fraction,
        "forward_s": times["F"],
        "backward_s": times["B"]
        if name != "zb-h1"
        else [i + w for i, w in zip(times["I"], times["W"], strict=True)],
        "send_post_median_s": statistics.median(sends) if sends else 0.0,
        "step_times_s": result["times"],
        "timeline": result["timelines"][-1],
        "_ideal_timeline": _ideal(
            schedule, _stage_times(result["timelines"][-1:], schedule.num_stages)
        ).timeline,
    }


def _plot(rows: list[dict[str, Any]], ranks: int, path: Path) -> None:
    """Measured (last step) above ideal timelines, one pair of charts per schedule."""
    from matplotlib.figure import Figure

    from partition.schedules.gantt import plot_gantt

    fig = Figure(figsize=(12, 2.2 * len(rows) * (0.6 + 0.35 * ranks)), layout="constrained")
    axes = fig.subplots(2 * len(rows), 1)
    for k, row in enumerate(rows):
        measured = [(r, Action.parse(a), s, e) for r, a, s, e in row["timeline"]]
        t0 = min(s for _, _, s, _ in measured)
        measured = [(r, a, s - t0, e - t0) for r, a, s, e in measured]
        label = row["schedule"] + (f" v={row['virtual']}" if row["virtual"] > 1 else "")
        plot_gantt(measured, num_ranks=ranks, title=f"{label}: measured", ax=axes[2 * k])
        plot_gantt(
            row["_ideal_timeline"], num_ranks=ranks, title=f"{label}: ideal", ax=axes[2 * k + 1]
        )
        span = max(max(e for *_, e in measured), row["ideal_step_s"])
        axes[2 * k].set_xlim(0, span)
        axes[2 * k + 1].set_xlim(0, span)
    fig.savefig(path, dpi=90)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="a smaller model and fewer steps (under a minute)"
    )
    parser.add_argument(
        "--ranks", type=int, default=2, help="pipeline ranks (default 2: one per core here)"
    )
    parser.add_argument("--steps", type=int, default=None, help="measured steps per schedule")
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    ranks, m = args.ranks, args.microbatches
    if args.quick:
        width, layers, seq, mb_rows, steps, warmup = 256, 4, 64, 4, args.steps or 5, 2
    else:
        width, layers, seq, mb_rows, steps, warmup = 384, 8, 128, 4, args.steps or 10, 3
    factory = functools.partial(model, width, layers, seq, mb_rows * m)
    started = time.monotonic()
    outcomes = spawn_ranks(_rank, ranks, (factory, m, warmup, steps), timeout=1800, pg_timeout=300)
    failed = [o for o in outcomes if not o.ok]
    if failed:
        for o in failed:
            print(o.describe(), o.traceback, file=sys.stderr)
        return 1
    per_rank = [o.value for o in outcomes]
    rows = []
    for i in range(len(SCHEDULES)):
        merged = dict(per_rank[0][i])
        merged["times"] = [max(r[i]["times"][k] for r in per_rank) for k in range(steps)]
        merged["timelines"] = [
            [e for r in per_rank for e in r[i]["timelines"][k]] for k in range(steps)
        ]
        rows.append(_analyse(merged, ranks, m))
    print(
        f"GPT width {width}, {layers} blocks, seq {seq}, {mb_rows} rows per micro-batch, {m} micro-batches, "
        f"{ranks} ranks, {steps} measured steps (median)"
    )
    print(
        f"{'schedule':<14}{'measured':>11}{'ideal':>11}{'overhead':>10}{'ideal bubble':>14}{'send post':>11}"
    )
    for row in rows:
        label = row["schedule"] + (f" v={row['virtual']}" if row["virtual"] > 1 else "")
        print(
            f"{label:<14}{row['measured_step_s'] * 1e3:>9.1f}ms{row['ideal_step_s'] * 1e3:>9.1f}ms"
            f"{row['overhead']:>10.1%}{row['ideal_bubble']:>14.1%}{row['send_post_median_s'] * 1e6:>9.0f}µs"
        )
    worst = max(row["overhead"] for row in rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    _plot(rows, ranks, png)
    print(
        f"worst overhead {worst:.1%} (goal {GOAL:.0%}); {time.monotonic() - started:.0f} s in all"
    )
    print(f"wrote {args.out} and {png}")
    args.out.write_text(
        json.dumps(
            {
                "question": "measured step time vs the schedule's ideal given measured stage compute times",
                "command": "python -m benchmarks.runtime_overhead"
                + (" --quick" if args.quick else ""),
                "machine": {
                    "platform": platform.platform(),
                    "cpus": os.cpu_count(),
                    "torch": torch.__version__,
                    "load_average_1m": os.getloadavg()[0],  # other processes share the cores
                },
                "model": {
                    "width": width,
                    "layers": layers,
                    "seq": seq,
                    "rows_per_microbatch": mb_rows,
                },
                "ranks": ranks,
                "microbatches": m,
                "goal": GOAL,
                "rows": [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows],
            },
            indent=1,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
