"""Which schedule trains fastest, and does the simulator predict what the runtime measures?

Question: for GPipe, 1F1B, interleaved 1F1B (2 virtual stages per rank) and ZB-H1, on 2 and 4
gloo ranks and several micro-batch counts, what step time, bubble and peak memory per rank does
pipepart's runtime measure, and how far is the simulator's prediction from it when the simulator
is given the *measured* per-stage compute times? Target: prediction within 10 % of measured.

Run:  python -m benchmarks.schedules [--quick] [--steps N] [--out PATH]

Writes ``results/schedules.json`` and ``results/schedules_gantt.png`` (measured above simulated,
one case). Each group (model, rank count, micro-batch count) runs in one set of spawned gloo
ranks (one thread each) that builds a `Pipeline` per schedule and steps them in turn, the order
rotating every round (A B C D, B C D A, ...), so that the schedules of a group share the
machine's load and can be compared with each other. How to read the table:

* **step** — median over steps of the slowest rank's ``Pipeline.step`` wall time (SGD
  included); **span** — first action start to last action end over all ranks, from the
  runtime's per-action timeline: the part of the step a schedule decides.
* **bubble** — ``1 - busy / (ranks × span)``, busy being the F/B/I/W actions' time.
* **predicted** — `partition.schedules.simulate.simulate` on the same schedule, driven by times taken from
  the step's own timeline: per stage, the mean F, B (I and W) durations, plus what the rank
  spends posting that stage's sends and the least it spent in one of its receives (a receive
  whose data is already there); per cut, the link time as the mean delay from the end of a
  send's posting to the end of a receive that was waiting for it, less that least receive. So
  the comparison tests the schedule model, not the FLOP/s guess. Each measured step is
  predicted from its own times (load varies between steps); **error** is the median over steps
  of predicted / span − 1. The compute-only prediction (free communication and no overheads,
  the simulator's default) is shown beside it.
* **memory** — per rank, the RSS growth during a step (``VmHWM`` reset before the step, after
  giving freed memory back with ``malloc_trim``) beside the planner's prediction of peak
  activations (the simulator's in-flight micro-batches × the cost model's saved bytes); and
  the peak RSS the rank would have running this schedule alone: its RSS before any pipeline,
  plus what building this one added, plus its step growth. Largest rank shown.

The machine has 2 cores: the 2-rank rows are the meaningful ones; 4 ranks oversubscribe it, ranks
wait for a core, and the prediction (which assumes a core per rank) may miss there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from benchmarks import _workloads
from benchmarks._workloads import Workload
from partition.schedules.actions import Action, Kind, build_schedule

RESULTS = Path(__file__).resolve().parent / "results" / "schedules.json"
TARGET = 0.10
SCHEDULES = (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb-h1", 1))
GANTT_CASE = ("gpt", 2, 8, "1f1b")  # model, ranks, micro-batches, schedule

Event = tuple[int, Action, float, float]


def _groups(quick: bool) -> list[tuple[str, int, int]]:
    """(model, ranks, micro-batches): each group runs every schedule in one set of ranks."""
    if quick:
        return [("gpt", 2, 4)]
    groups = []
    for model in ("gpt", "skipnet"):
        groups += [(model, 2, m) for m in (4, 8, 16)] + [(model, 4, 8)]
    return groups


def _workload(model: str, m: int, quick: bool) -> Workload:
    if quick:
        return _workloads.gpt(m, layers=4, rows=1, width=128)
    return _workloads.gpt(m) if model == "gpt" else _workloads.skipnet(m)


# --- on each rank ---------------------------------------------------------------------------


def _step_memory() -> float:
    """Return freed memory to the OS and restart the peak-RSS counter; the RSS now (MiB)."""
    import ctypes

    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    return _workloads.rss_mib()[0]


def _rank(
    workload: Workload,
    plans: list[tuple[str, int, tuple[int, ...]]],
    warmup: int,
    steps: int,
    inputs: tuple[torch.Tensor, ...],
    target: torch.Tensor,
) -> dict[str, Any]:
    """Build one `Pipeline` per schedule, then step them in turn, the order rotating."""
    from pipeline.runtime.pipeline import Pipeline, PipelineOptions

    start_mib = _workloads.rss_mib()[0]
    pipes, built = [], []
    for schedule, virtual, bounds in plans:
        before = _step_memory()
        options = PipelineOptions(
            schedule=schedule, microbatches=workload.microbatches, virtual=virtual, bounds=bounds
        )
        pipes.append(
            Pipeline(
                workload,
                options=options,
                optimizer_factory=lambda ps: torch.optim.SGD(ps, lr=1e-3),
            )
        )
        built.append(_workloads.rss_mib()[0] - before)
    out: list[dict[str, Any]] = [{"times": [], "timelines": [], "growth": []} for _ in plans]
    for k in range(warmup + steps):
        for j in range(len(plans)):
            i = (j + k) % len(plans)
            base = _step_memory()
            dist.barrier()
            t0 = time.perf_counter()
            pipes[i].step(inputs, target)
            wall = time.perf_counter() - t0
            if k >= warmup:
                out[i]["times"].append(wall)
                out[i]["timelines"].append([(r, str(a), s, e) for r, a, s, e in pipes[i].timeline])
                out[i]["growth"].append(_workloads.rss_mib()[1] - base)
    return {"rank": dist.get_rank(), "start_mib": start_mib, "built_mib": built, "schedules": out}


# --- measured times and the prediction ------------------------------------------------------


def _step_events(per_rank: list[dict[str, Any]], k: int) -> list[Event]:
    return [(r, Action.parse(a), s, e) for out in per_rank for r, a, s, e in out["timelines"][k]]


def _profile(steps: list[list[Event]], num_stages: int) -> dict[str, Any]:
    """Per-stage compute and overhead times and per-cut link times, from measured timelines.

    Means, not medians: a step is a sum of action times, and on a loaded machine their
    distribution has a long tail (a rank descheduled mid-action) that a median would drop.
    """
    dur: dict[tuple[Kind, int], list[float]] = defaultdict(list)
    links: dict[int, list[tuple[Kind, int, float]]] = defaultdict(list)  # per cut
    for events in steps:
        by_action = {a: (s, e) for _, a, s, e in events}
        for _, a, s, e in events:
            dur[a.kind, a.stage].append(e - s)
            # A receive that started before its send was posted waited for it: its end minus
            # the end of the posting is the time the data took to arrive, plus the receive's
            # own cost (taken off below, as it is charged to the receiving stage).
            if a.kind in (Kind.RECV_F, Kind.RECV_B):
                fwd = a.kind is Kind.RECV_F
                src = a.stage - 1 if fwd else a.stage + 1
                sent = by_action.get(Action(src, Kind.SEND_F if fwd else Kind.SEND_B, a.microbatch))
                if sent is not None and s < sent[1]:
                    links[min(a.stage, src)].append((a.kind, a.stage, e - sent[1]))

    def mean(kind: Kind, stage: int) -> float:
        values = dur.get((kind, stage))
        return statistics.fmean(values) if values else 0.0

    def least(kind: Kind, stage: int) -> float:  # a receive whose data was already there
        values = dur.get((kind, stage))
        return min(values) if values else 0.0

    stages = range(num_stages)
    zero_bubble = any(kind is Kind.I for kind, _ in dur)
    if zero_bubble:
        weight = [mean(Kind.W, s) for s in stages]
        backward = [mean(Kind.I, s) + w for s, w in zip(stages, weight, strict=True)]
    else:
        weight = None
        backward = [mean(Kind.B, s) for s in stages]
    forward = [mean(Kind.F, s) for s in stages]
    # Rank-side costs of communicating, charged to the compute that sends or receives.
    forward_extra = [mean(Kind.SEND_F, s) + least(Kind.RECV_F, s) for s in stages]
    backward_extra = [mean(Kind.SEND_B, s) + least(Kind.RECV_B, s) for s in stages]
    comm = []
    for cut in range(num_stages - 1):
        waits = [max(d - least(k, s), 0.0) for k, s, d in links.get(cut, [])]
        comm.append(statistics.fmean(waits) if waits else 0.0)
    return {
        "forward": forward,
        "backward": backward,
        "weight": weight,
        "forward_extra": forward_extra,
        "backward_extra": backward_extra,
        "comm": comm,
        # For diagnosis: per stage, the mean time in each communication action.
        "send_f": [mean(Kind.SEND_F, s) for s in stages],
        "send_b": [mean(Kind.SEND_B, s) for s in stages],
        "recv_f": [mean(Kind.RECV_F, s) for s in stages],
        "recv_b": [mean(Kind.RECV_B, s) for s in stages],
    }


def _predict(
    schedule: str, ranks: int, m: int, virtual: int, profile: dict[str, Any], full: bool
) -> Any:
    from partition.schedules.simulate import simulate

    sched = build_schedule(schedule, ranks, m, virtual)
    forward, backward, weight = profile["forward"], profile["backward"], profile["weight"]
    if not full:
        return simulate(sched, forward_time=forward, backward_time=backward, weight_time=weight)
    fwd = [f + x for f, x in zip(forward, profile["forward_extra"], strict=True)]
    # With I and W, the simulator gives I what B has beyond W: the extras land on I, which
    # receives and sends; W keeps its measured time.
    bwd = [b + x for b, x in zip(backward, profile["backward_extra"], strict=True)]
    return simulate(
        sched, forward_time=fwd, backward_time=bwd, weight_time=weight, comm_time=profile["comm"]
    )


def _measured(steps: list[list[Event]], ranks: int) -> tuple[float, float]:
    """Median span and median bubble of the steps' timelines."""
    spans, bubbles = [], []
    for events in steps:
        span = max(e for *_, e in events) - min(s for _, _, s, _ in events)
        busy = sum(e - s for _, a, s, e in events if a.kind.value in "FBIW")
        spans.append(span)
        bubbles.append(1 - busy / (ranks * span))
    return statistics.median(spans), statistics.median(bubbles)


def run_group(
    model: str, ranks: int, m: int, *, quick: bool, steps: int
) -> list[tuple[dict[str, Any], list[Event], Any]]:
    """Every schedule on one model, rank count and micro-batch count, in one set of ranks."""
    from partition import analyze, plan_analysis
    from partition.devices import parse_devices
    from partition.models.registry import build_meta_model
    from pipeline.launch.spawn import spawn_ranks

    workload = _workload(model, m, quick)
    built = build_meta_model(workload)
    analysis = analyze(built.model, built.args or (), built.kwargs, microbatches=m)
    devices = parse_devices("cpu", ranks)
    plans = [
        plan_analysis(analysis, devices, schedule=schedule, virtual=virtual)
        for schedule, virtual in SCHEDULES
    ]
    inputs, target = _workloads.batch(workload)
    warmup = 1 if quick else 2
    outcomes = spawn_ranks(
        _rank,
        ranks,
        (
            workload,
            [(p.schedule, p.virtual, p.bounds) for p in plans],
            warmup,
            steps,
            inputs,
            target,
        ),
        timeout=1800,
        pg_timeout=300,
        start_method="forkserver",
        preload=("torch._dynamo", "pipeline.runtime.pipeline", "benchmarks._workloads"),
    )
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise RuntimeError("\n".join(f"{o.describe()}\n{o.traceback}" for o in failed))
    results = []
    for i, plan in enumerate(plans):
        per_rank = [
            {
                **o.value["schedules"][i],
                "start_mib": o.value["start_mib"],
                "built_mib": o.value["built_mib"][i],
            }
            for o in outcomes
        ]
        results.append(_analyse(model, workload, ranks, plan, m, steps, per_rank))
    return results


def _analyse(
    model: str,
    workload: Workload,
    ranks: int,
    plan: Any,
    m: int,
    steps: int,
    per_rank: list[dict[str, Any]],
) -> tuple[dict[str, Any], list[Event], Any]:
    """One schedule's row: measured, predicted per step, memory."""
    schedule, virtual = plan.schedule, plan.virtual
    S = ranks * virtual
    step_events = [_step_events(per_rank, k) for k in range(steps)]
    # Each measured step is predicted from its own action times, so that load changing between
    # steps does not count as prediction error; the row reports medians over the steps.
    per_step = []
    for events in step_events:
        profile = _profile([events], S)
        full = _predict(schedule, ranks, m, virtual, profile, full=True)
        compute_only = _predict(schedule, ranks, m, virtual, profile, full=False)
        span, bubble = _measured([events], ranks)
        busy = sum(e - s for _, a, s, e in events if a.kind.value in "FBIW")
        per_step.append(
            {
                "span": span,
                "bubble": bubble,
                "predicted": full.step_time,
                "predicted_bubble": 1 - busy / (ranks * full.step_time),
                "error": full.step_time / span - 1,
                "compute_only": compute_only.step_time,
                "compute_only_error": compute_only.step_time / span - 1,
                "full": full,
                "events": events,
            }
        )

    def med(key: str) -> float:
        return statistics.median(p[key] for p in per_step)

    typical = sorted(per_step, key=lambda p: p["span"])[len(per_step) // 2]
    wall = statistics.median(max(r["times"][k] for r in per_rank) for k in range(steps))
    # Predicted activation memory: peak in-flight micro-batches × saved bytes, per rank.
    peak_mb = typical["full"].peak_activation_microbatches
    act = [0.0] * ranks
    for s, stage in enumerate(plan.stages):
        act[s % ranks] += peak_mb[s] * stage.saved_bytes / 2**20
    row = {
        "model": model,
        "workload": workload.describe(),
        "ranks": ranks,
        "schedule": schedule,
        "virtual": virtual,
        "microbatches": m,
        "bounds": list(plan.bounds),
        "steps": steps,
        "step_s": wall,
        "span_s": med("span"),
        "bubble": med("bubble"),
        "predicted_s": med("predicted"),
        "predicted_bubble": med("predicted_bubble"),
        "error": med("error"),
        "error_range": [min(p["error"] for p in per_step), max(p["error"] for p in per_step)],
        "compute_only_s": med("compute_only"),
        "compute_only_error": med("compute_only_error"),
        "start_rss_mib": [r["start_mib"] for r in per_rank],
        "built_mib": [r["built_mib"] for r in per_rank],
        "rss_growth_mib": [max(r["growth"]) for r in per_rank],
        "peak_rss_mib": [r["start_mib"] + r["built_mib"] + max(r["growth"]) for r in per_rank],
        "predicted_activation_mib": act,
        "profile_s": _profile(step_events, S),
        "step_times_s": [max(r["times"][k] for r in per_rank) for k in range(steps)],
    }
    return row, typical["events"], typical["full"]


def _gantt(path: Path, title: str, measured: list[Event], simulated: Any, ranks: int) -> None:
    from matplotlib.figure import Figure

    from partition.schedules.gantt import plot_gantt

    t0 = min(s for _, _, s, _ in measured)
    shifted = [(r, a, s - t0, e - t0) for r, a, s, e in measured]
    fig = Figure(figsize=(11, 2.2 + 1.4 * ranks), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    plot_gantt(shifted, num_ranks=ranks, title=f"measured: {title}", ax=top)
    plot_gantt(
        simulated.timeline, num_ranks=ranks, title="simulated from measured stage times", ax=bottom
    )
    span = max(max(e for *_, e in shifted), simulated.step_time)
    top.set_xlim(0, span)
    bottom.set_xlim(0, span)
    fig.savefig(path, dpi=110)


def _print(rows: list[dict[str, Any]], load: tuple[float, float]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"schedules: measured vs simulated (load {load[0]:.1f} → {load[1]:.1f})")
    cols = (
        "model",
        "ranks",
        "schedule",
        "m",
        "step ms",
        "span ms",
        "predicted ms",
        "error",
        "compute-only err",
        "bubble",
        "pred. bubble",
        "peak RSS MiB",
        "RSS growth MiB",
        "pred. act. MiB",
    )
    for col in cols:
        table.add_column(col, justify="right")
    for r in rows:
        label = r["schedule"] + (f" v={r['virtual']}" if r["virtual"] > 1 else "")
        table.add_row(
            r["model"],
            str(r["ranks"]),
            label,
            str(r["microbatches"]),
            f"{r['step_s'] * 1e3:.1f}",
            f"{r['span_s'] * 1e3:.1f}",
            f"{r['predicted_s'] * 1e3:.1f}",
            f"{r['error']:+.1%}",
            f"{r['compute_only_error']:+.1%}",
            f"{r['bubble']:.1%}",
            f"{r['predicted_bubble']:.1%}",
            f"{max(r['peak_rss_mib']):.0f}",
            f"{max(r['rss_growth_mib']):.0f}",
            f"{max(r['predicted_activation_mib']):.1f}",
        )
    Console(width=220).print(table)


def main(argv: Sequence[str] | None = None) -> int:
    from rich.progress import Progress

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small group (CI smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per schedule")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args(argv)
    steps = args.steps or (2 if args.quick else 5)
    groups = _groups(args.quick)
    gantt_case = (*groups[0], "1f1b") if args.quick else GANTT_CASE
    load0 = os.getloadavg()[0]
    started = time.monotonic()
    rows, gantt = [], None
    with Progress(transient=True) as progress:
        task = progress.add_task("groups", total=len(groups))
        for model, ranks, m in groups:
            progress.update(task, description=f"{model}, {ranks} ranks, {m} micro-batches")
            for row, events, simulated in run_group(model, ranks, m, quick=args.quick, steps=steps):
                rows.append(row)
                if (model, ranks, m, row["schedule"]) == gantt_case:
                    gantt = (row, events, simulated)
            progress.advance(task)
    load = (load0, os.getloadavg()[0])
    _print(rows, load)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_name(args.out.stem + "_gantt.png")
    if gantt is not None:
        row, events, simulated = gantt
        span = max(e for *_, e in events) - min(s for _, _, s, _ in events)
        title = (
            f"{row['model']}, {row['ranks']} ranks, {row['schedule']}, {row['microbatches']} "
            f"micro-batches, the step of median span (span {span * 1e3:.0f} ms, predicted "
            f"{simulated.step_time * 1e3:.0f} ms)"
        )
        _gantt(png, title, events, simulated, row["ranks"])
    two = [r for r in rows if r["ranks"] == 2]
    summary = {
        "target_error": TARGET,
        "worst_abs_error_2_ranks": max(abs(r["error"]) for r in two) if two else None,
        "median_abs_error_2_ranks": statistics.median(abs(r["error"]) for r in two)
        if two
        else None,
        "within_target_2_ranks": sum(abs(r["error"]) <= TARGET for r in two),
        "cases_2_ranks": len(two),
        "worst_abs_error_4_ranks": max(
            (abs(r["error"]) for r in rows if r["ranks"] == 4), default=None
        ),
    }
    print(f"summary: {json.dumps(summary)}; {time.monotonic() - started:.0f} s")
    report = {
        "question": "measured step, bubble and memory of each schedule vs the simulator's prediction",
        "command": "python -m benchmarks.schedules" + (" --quick" if args.quick else ""),
        "quick": args.quick,
        "machine": _workloads.machine(load),
        "summary": summary,
        "gantt": png.name if gantt is not None else None,
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out} and {png.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
