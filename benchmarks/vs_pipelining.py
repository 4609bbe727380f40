"""Is pipepart's runtime as fast and as lean as ``torch.distributed.pipelining``?

Question: on the same model, the same split, the same micro-batches and the same schedule, what
is the ratio pipepart / pipelining of the median training-step time and of the peak memory per
rank, and do both give the same loss and gradients? Target: time ratio <= 1.0; goal 0.9.

Run:  python -m benchmarks.vs_pipelining [--quick] [--rounds N] [--out PATH]

How it is fair:

* Same modules. Every rank builds a pipepart `Pipeline` and wraps *the very same* stage
  GraphModules (`partition.split`: tuples of tensors in and out) in
  ``torch.distributed.pipelining.PipelineStage``; the schedules are pipelining's own
  ``ScheduleGPipe``, ``Schedule1F1B`` and ``ScheduleInterleaved1F1B`` (looping placement,
  stage s on rank s % p, as pipepart's) — or, in rows marked "same actions", pipepart's own
  per-rank action lists run by pipelining's action runtime (``_PipelineScheduleRuntime``, a
  private class): how ZB-H1 and pipepart's interleaved order are compared.
* Same data and semantics. One batch, cut in ``m`` micro-batches along dimension 0 by both
  (``tensor_split``); mean loss: pipepart scales each micro-batch loss by 1/m before backward,
  pipelining divides the gradients by m afterwards (``scale_grads=True``). Pipelining is called
  with ``return_outputs=False`` (pipepart does not gather outputs either). No optimizer: a step
  is zero-grad + schedule, gradients left in ``.grad`` — so the weights never change and every
  step does the same work.
* Time: in one set of spawned gloo ranks (one thread each), steps alternate pipepart /
  pipelining, the order flipping each round (AB BA AB ...), each preceded by a barrier; a
  step's time is its slowest rank's wall time. Reported: the ratio of the medians; the median
  and quartiles of each round's ratio (paired, robust to the load drifting); and the ratio of
  CPU seconds per step summed over ranks (which waiting for a core does not inflate). First a
  check step: loss and every gradient of both, compared.
* Memory: two more spawns per case, one per runtime, each alone in its processes (its own
  stage modules and buffers); peak RSS (``VmHWM``) of the largest rank over warm-up and steps,
  and its growth over the RSS the rank started with.

Pipelining needs two workarounds here, both copies pipepart makes too: gloo refuses
non-contiguous tensors and pipelining receives into buffers with the sender's strides, so its
stage modules are wrapped to make outputs and input gradients contiguous (the partitioner may
cut after a ``transpose``); and every rank's schedule gets the ``loss_fn`` (without it a rank
runs no backward).

Where the time goes, per rank: pipepart's per-action timeline gives compute (F/B/I/W), posting
sends, receiving, and the rest of the step; for pipelining, its stages' ``forward_one_chunk`` /
``backward_one_chunk`` / ``backward_weight_one_chunk`` and its ``_batch_p2p`` /
``_wait_batch_p2p`` are timed by wrappers. On a 2-core machine 2 ranks are the meaningful
rows; 4 ranks oversubscribe the cores.
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
import torch.distributed as dist

from benchmarks import _workloads
from benchmarks._workloads import Workload
from partition.schedules.actions import Schedule

RESULTS = Path(__file__).resolve().parent / "results" / "vs_pipelining.json"
TARGET, GOAL = 1.0, 0.9

# (model, ranks, schedule, virtual, micro-batches, how pipelining runs it): "native" is
# pipelining's own schedule class; "actions" is pipepart's action lists in pipelining's runtime.
FULL = [
    ("gpt", 2, "gpipe", 1, 8, "native"),
    ("gpt", 2, "1f1b", 1, 8, "native"),
    ("gpt", 2, "interleaved", 2, 8, "native"),
    ("gpt", 2, "interleaved", 2, 8, "actions"),
    ("gpt", 2, "zb-h1", 1, 8, "actions"),
    ("gpt", 2, "1f1b", 1, 16, "native"),
    ("skipnet", 2, "gpipe", 1, 8, "native"),
    ("skipnet", 2, "1f1b", 1, 8, "native"),
    ("skipnet", 2, "interleaved", 2, 8, "native"),
    ("skipnet", 2, "zb-h1", 1, 8, "actions"),
    ("gpt", 4, "1f1b", 1, 8, "native"),
]
QUICK = [("gpt", 2, "1f1b", 1, 4, "native"), ("gpt", 2, "zb-h1", 1, 4, "actions")]


def _workload(model: str, m: int, quick: bool) -> Workload:
    if quick:
        return (_workloads.gpt if model == "gpt" else _workloads.skipnet)(
            m, layers=4, rows=1, width=128
        )
    return _workloads.gpt(m) if model == "gpt" else _workloads.skipnet(m)


# --- on each rank ---------------------------------------------------------------------------


class _Timed:
    """Wraps a bound method, adding its wall time to ``seconds``."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class _Contiguous(torch.nn.Module):
    """A stage module whose outputs and input gradients are contiguous.

    Pipelining receives into buffers with the sender's strides, and gloo refuses a tensor that
    is not contiguous: a cut after a ``transpose`` fails both ways (activation and gradient).
    Pipepart makes the same copies (``contiguous()`` in its send).
    """

    def __init__(self, module: torch.nn.Module, last: bool) -> None:
        super().__init__()
        self.module, self.last = module, last

    def forward(self, *args: Any) -> Any:
        args = tuple(_ContiguousGrad.apply(a) if a.requires_grad else a for a in args)
        out = self.module(*args)
        return out if self.last else tuple(t.contiguous() for t in out)


class _Pipelining:
    """``torch.distributed.pipelining`` over given stage modules, stepped like a `Pipeline`.

    With ``actions`` (a pipepart `Schedule`), pipelining's own action runtime
    (``_PipelineScheduleRuntime``, a private class) runs exactly pipepart's per-rank compute
    order, communication inserted by pipelining: the way to compare ZB-H1, which pipelining has
    no single-stage-per-rank class for, and pipepart's interleaved order.
    """

    def __init__(
        self,
        modules: dict[int, torch.nn.Module],
        num_stages: int,
        schedule: str,
        m: int,
        loss_fn: Callable[..., torch.Tensor],
        actions: Schedule | None = None,
    ) -> None:
        from torch.distributed.pipelining import (
            PipelineStage,
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
        )
        from torch.distributed.pipelining import schedules as pl

        device = torch.device("cpu")
        self.stages: list[Any] = [
            PipelineStage(_Contiguous(mod, s == num_stages - 1), s, num_stages, device)
            for s, mod in modules.items()
        ]
        self.params = [p for mod in modules.values() for p in mod.parameters()]
        self.has_first = 0 in modules
        self.has_last = num_stages - 1 in modules
        self.compute: list[_Timed] = []
        for stage in self.stages:  # compute time, for the breakdown
            for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
                timer = _Timed(getattr(stage, name))
                setattr(stage, name, timer)
                self.compute.append(timer)
        # Communication time: pipelining posts through these two module functions.
        if not isinstance(pl._batch_p2p, _Timed):
            pl._batch_p2p = _Timed(pl._batch_p2p)
            pl._wait_batch_p2p = _Timed(pl._wait_batch_p2p)
        self.comm: list[Any] = [pl._batch_p2p, pl._wait_batch_p2p]
        if actions is not None:
            kinds = {
                "F": pl._ComputationType.FORWARD,
                "B": pl._ComputationType.FULL_BACKWARD,
                "I": pl._ComputationType.BACKWARD_INPUT,
                "W": pl._ComputationType.BACKWARD_WEIGHT,
            }
            runtime = pl._PipelineScheduleRuntime(self.stages, m, loss_fn=loss_fn, scale_grads=True)
            runtime._prepare_schedule_with_comms(
                {
                    r: [pl._Action(a.stage, kinds[a.kind.value], a.microbatch) for a in row]
                    for r, row in enumerate(actions.actions)
                }
            )
            self.schedule: Any = runtime
        elif schedule == "interleaved":
            self.schedule = ScheduleInterleaved1F1B(self.stages, m, loss_fn=loss_fn)
        elif schedule in ("zb-v", "dualpipev"):  # V placement: stages r and 2p-1-r
            v_cls = {"zb-v": pl.ScheduleZBVZeroBubble, "dualpipev": pl.ScheduleDualPipeV}
            self.schedule = v_cls[schedule](self.stages, m, loss_fn=loss_fn, scale_grads=True)
        else:
            cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
            (stage,) = self.stages
            self.schedule = cls(stage, m, loss_fn=loss_fn, scale_grads=True)

    def step(self, inputs: tuple[torch.Tensor, ...], target: torch.Tensor) -> torch.Tensor | None:
        for p in self.params:
            p.grad = None
        losses: list[torch.Tensor] = []
        args = inputs if self.has_first else ()
        kwargs: dict[str, Any] = {"return_outputs": False}
        if self.has_last:
            kwargs.update(target=target, losses=losses)
        self.schedule.step(*args, **kwargs)
        return torch.stack(losses).detach().mean() if self.has_last else None

    def seconds(self) -> tuple[float, float]:
        """Compute and communication seconds so far."""
        return sum(t.seconds for t in self.compute), sum(t.seconds for t in self.comm)


def _pipepart(workload: Workload, schedule: str, virtual: int, bounds: tuple[int, ...]) -> Any:
    from pipeline.runtime.pipeline import Pipeline, PipelineOptions

    options = PipelineOptions(
        schedule=schedule, microbatches=workload.microbatches, virtual=virtual, bounds=bounds
    )
    return Pipeline(workload, options=options)


def _own_stages(
    workload: Workload, schedule: str, virtual: int, bounds: tuple[int, ...]
) -> dict[int, torch.nn.Module]:
    """This rank's stage modules with pipepart's weights, built without a `Pipeline` (for the
    memory run of pipelining alone): the same trace, split and per-module initialisation."""
    from partition import analyze
    from partition.models.registry import build_meta_model
    from partition.split import split
    from pipeline.runtime.init import materialize

    built = build_meta_model(workload)
    analysis = analyze(
        built.model, built.args or (), built.kwargs, microbatches=workload.microbatches
    )
    stages = split(analysis.traced, analysis.graph, bounds)
    rank, world = dist.get_rank(), dist.get_world_size()
    hook = getattr(built.model, "_init_weights", None)
    mine: dict[int, torch.nn.Module] = {}
    mine_ids = (
        (rank, len(stages) - 1 - rank)
        if schedule in ("zb-v", "dualpipev")
        else range(rank, len(stages), world)
    )
    for s in mine_ids:
        materialize(stages[s].module, torch.device("cpu"), seed=0, init_hook=hook)
        mine[s] = stages[s].module
    return mine


def _timed_step(step: Callable[[], Any]) -> tuple[float, Any]:
    dist.barrier()
    t0 = time.perf_counter()
    out = step()
    return time.perf_counter() - t0, out


def _breakdown(timeline: Sequence[Any], wall: float) -> dict[str, float]:
    """Seconds of one rank's step by what the rank was doing (pipepart's timeline)."""
    out = {"compute": 0.0, "send": 0.0, "recv": 0.0}
    for _, action, start, end in timeline:
        kind = action.kind.value
        key = "compute" if kind in "FBIW" else "send" if kind[0] == "S" else "recv"
        out[key] += end - start
    out["comm"] = out["send"] + out["recv"]
    out["other"] = wall - out["compute"] - out["comm"]
    out["actions"] = float(len(timeline))
    return out


def _runners(
    workload: Workload,
    schedule: str,
    virtual: int,
    bounds: tuple[int, ...],
    mode: str,
    modules: dict[int, torch.nn.Module],
) -> _Pipelining:
    from partition.schedules.actions import build_schedule

    actions = None
    if mode == "actions":
        actions = build_schedule(schedule, dist.get_world_size(), workload.microbatches, virtual)
    return _Pipelining(
        modules, len(bounds) - 1, schedule, workload.microbatches, workload.loss_fn, actions
    )


def _rank_both(
    workload: Workload,
    schedule: str,
    virtual: int,
    bounds: tuple[int, ...],
    mode: str,
    rounds: int,
    warmup: int,
    inputs: tuple[torch.Tensor, ...],
    target: torch.Tensor,
) -> dict[str, Any]:
    """Both runtimes on the same modules: a check step, then alternating timed steps."""
    pipe = _pipepart(workload, schedule, virtual, bounds)
    modules = {s: pipe.stages[s].module for s in pipe.my_stages}
    other = _runners(workload, schedule, virtual, bounds, mode, modules)
    named = pipe.named_parameters()

    # The check: one step of each from the same weights on the same batch.
    loss_a = pipe.step(inputs, target)
    grads_a = {n: p.grad.clone() for n, p in named.items() if p.grad is not None}
    loss_b = other.step(inputs, target)  # also pipelining's shape inference (first step)
    grads_b = {n: p.grad.clone() for n, p in named.items() if p.grad is not None}
    worst_abs, worst_rel, worst_name = 0.0, 0.0, ""
    for n in grads_a.keys() | grads_b.keys():
        if n not in grads_a or n not in grads_b:
            worst_abs, worst_rel, worst_name = float("inf"), float("inf"), n
            continue
        diff = float((grads_a[n] - grads_b[n]).abs().max())
        scale = float(grads_b[n].abs().max()) or 1.0
        if diff / scale >= worst_rel:
            worst_abs, worst_rel, worst_name = diff, diff / scale, n
    check = {
        "loss_pipepart": None if loss_a is None else float(loss_a),
        "loss_pipelining": None if loss_b is None else float(loss_b),
        "grads_compared": len(grads_a),
        "grad_max_abs_diff": worst_abs,
        "grad_max_rel_diff": worst_rel,
        "grad_worst": worst_name,
    }

    steps = {
        "pipepart": lambda: pipe.step(inputs, target),
        "pipelining": lambda: other.step(inputs, target),
    }
    for _ in range(warmup):
        for fn in steps.values():
            _timed_step(fn)
    times: dict[str, list[float]] = {"pipepart": [], "pipelining": []}
    cpu: dict[str, list[float]] = {"pipepart": [], "pipelining": []}
    ours, theirs = [], []
    for r in range(rounds):
        order = ["pipepart", "pipelining"] if r % 2 == 0 else ["pipelining", "pipepart"]
        for name in order:
            compute0, comm0 = other.seconds()
            cpu0 = time.process_time()
            wall, _ = _timed_step(steps[name])
            cpu[name].append(time.process_time() - cpu0)
            times[name].append(wall)
            if name == "pipepart":
                ours.append(_breakdown(pipe.timeline, wall))
            else:
                compute1, comm1 = other.seconds()
                compute, comm = compute1 - compute0, comm1 - comm0
                theirs.append({"compute": compute, "comm": comm, "other": wall - compute - comm})
    return {
        "rank": pipe.rank,
        "stages": list(pipe.my_stages),
        "check": check,
        "times": times,
        "cpu": cpu,
        "pipepart_breakdown": {k: statistics.median(b[k] for b in ours) for k in ours[0]},
        "pipelining_breakdown": {k: statistics.median(b[k] for b in theirs) for k in theirs[0]},
    }


def _rank_alone(
    runtime: str,
    workload: Workload,
    schedule: str,
    virtual: int,
    bounds: tuple[int, ...],
    mode: str,
    steps: int,
    inputs: tuple[torch.Tensor, ...],
    target: torch.Tensor,
) -> dict[str, float]:
    """One runtime alone in its process: its peak RSS over a few steps."""
    start = _workloads.rss_mib()[0]
    if runtime == "pipepart":
        pipe = _pipepart(workload, schedule, virtual, bounds)
        step: Callable[[], Any] = lambda: pipe.step(inputs, target)  # noqa: E731
    else:
        modules = _own_stages(workload, schedule, virtual, bounds)
        runner = _runners(workload, schedule, virtual, bounds, mode, modules)
        step = lambda: runner.step(inputs, target)  # noqa: E731
    for _ in range(steps):
        _timed_step(step)
    peak = _workloads.rss_mib()[1]
    return {"start_mib": start, "peak_mib": peak, "growth_mib": peak - start}


# --- in the benchmark process ---------------------------------------------------------------


def _bounds(workload: Workload, ranks: int, schedule: str, virtual: int) -> tuple[int, ...]:
    """The split both runtimes use: pipepart's partitioner on this model, CPU devices."""
    from partition import analyze
    from partition.devices import parse_devices
    from partition.models.registry import build_meta_model
    from partition.solve import solve

    built = build_meta_model(workload)
    analysis = analyze(
        built.model, built.args or (), built.kwargs, microbatches=workload.microbatches
    )
    solution = solve(
        analysis.graph,
        parse_devices("cpu", ranks),
        schedule=schedule,
        microbatches=workload.microbatches,
        virtual=virtual,
    )
    return tuple(int(b) for b in solution.bounds)


def _spawn(fn: Callable[..., Any], ranks: int, args: tuple[Any, ...]) -> list[Any]:
    from pipeline.launch.spawn import spawn_ranks

    outcomes = spawn_ranks(
        fn,
        ranks,
        args,
        timeout=900,
        pg_timeout=300,
        start_method="forkserver",
        preload=(
            "torch._dynamo",
            "pipeline.runtime.pipeline",
            "torch.distributed.pipelining",
            "benchmarks._workloads",
        ),
    )
    failed = [o for o in outcomes if not o.ok]
    if failed:
        details = "\n".join(f"{o.describe()}\n{o.traceback}" for o in failed)
        raise RuntimeError(f"a rank failed:\n{details}")
    return [o.value for o in outcomes]


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], statistics.median(values), q[2]


def run_case(
    model: str,
    ranks: int,
    schedule: str,
    virtual: int,
    m: int,
    mode: str,
    *,
    quick: bool,
    rounds: int,
    memory: bool,
) -> dict[str, Any]:
    workload = _workload(model, m, quick)
    bounds = _bounds(workload, ranks, schedule, virtual)
    inputs, target = _workloads.batch(workload)
    warmup = 1 if quick else 2
    per_rank = _spawn(
        _rank_both,
        ranks,
        (workload, schedule, virtual, bounds, mode, rounds, warmup, inputs, target),
    )
    names = ("pipepart", "pipelining")
    step = {n: [max(r["times"][n][k] for r in per_rank) for k in range(rounds)] for n in names}
    cpu = {n: [sum(r["cpu"][n][k] for r in per_rank) for k in range(rounds)] for n in names}
    median = {n: statistics.median(ts) for n, ts in step.items()}
    paired = [a / b for a, b in zip(step["pipepart"], step["pipelining"], strict=True)]
    low, mid, high = _quartiles(paired)
    checks = [r["check"] for r in per_rank]
    last = next(c for c in checks if c["loss_pipepart"] is not None)
    row: dict[str, Any] = {
        "model": model,
        "workload": workload.describe(),
        "ranks": ranks,
        "schedule": schedule,
        "virtual": virtual,
        "microbatches": m,
        "pipelining_runs": mode,
        "bounds": list(bounds),
        "rounds": rounds,
        "step_s": median,
        "step_times_s": step,
        "time_ratio": median["pipepart"] / median["pipelining"],
        "paired_ratio": {"q1": low, "median": mid, "q3": high},
        "cpu_s": {n: statistics.median(v) for n, v in cpu.items()},
        "cpu_ratio": statistics.median(cpu["pipepart"]) / statistics.median(cpu["pipelining"]),
        "loss": {"pipepart": last["loss_pipepart"], "pipelining": last["loss_pipelining"]},
        "loss_abs_diff": abs(last["loss_pipepart"] - last["loss_pipelining"]),
        "grad_max_rel_diff": max(c["grad_max_rel_diff"] for c in checks),
        "grad_max_abs_diff": max(c["grad_max_abs_diff"] for c in checks),
        "grads_compared": sum(c["grads_compared"] for c in checks),
        "pipepart_breakdown_s": [r["pipepart_breakdown"] for r in per_rank],
        "pipelining_breakdown_s": [r["pipelining_breakdown"] for r in per_rank],
        "memory": None,
        "memory_ratio": None,
        "memory_growth_ratio": None,
    }
    if memory:
        mem = {
            runtime: _spawn(
                _rank_alone,
                ranks,
                (runtime, workload, schedule, virtual, bounds, mode, 1 + warmup, inputs, target),
            )
            for runtime in names
        }
        row["memory"] = mem
        peak = {k: max(r["peak_mib"] for r in v) for k, v in mem.items()}
        growth = {k: max(r["growth_mib"] for r in v) for k, v in mem.items()}
        row["memory_ratio"] = peak["pipepart"] / peak["pipelining"]
        row["memory_growth_ratio"] = growth["pipepart"] / growth["pipelining"]
    return row


def _label(row: dict[str, Any]) -> str:
    label = row["schedule"] + (f" v={row['virtual']}" if row["virtual"] > 1 else "")
    return label + (" (same actions)" if row["pipelining_runs"] == "actions" else "")


def _print(rows: list[dict[str, Any]], load: tuple[float, float]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=220)
    table = Table(
        title=f"pipepart / torch.distributed.pipelining (load average {load[0]:.1f} → {load[1]:.1f})"
    )
    cols = (
        "model",
        "ranks",
        "schedule",
        "m",
        "pipepart ms",
        "pipelining ms",
        "time ratio",
        "paired ratio [q1, q3]",
        "CPU ratio",
        "peak RSS ratio",
        "RSS growth ratio",
        "Δloss",
        "max rel Δgrad",
    )
    for col in cols:
        table.add_column(col, justify="right")
    for r in rows:
        mem = "-" if r["memory_ratio"] is None else f"{r['memory_ratio']:.3f}"
        growth = "-" if r["memory_growth_ratio"] is None else f"{r['memory_growth_ratio']:.3f}"
        pr = r["paired_ratio"]
        table.add_row(
            r["model"],
            str(r["ranks"]),
            _label(r),
            str(r["microbatches"]),
            f"{r['step_s']['pipepart'] * 1e3:.1f}",
            f"{r['step_s']['pipelining'] * 1e3:.1f}",
            f"{r['time_ratio']:.3f}",
            f"{pr['median']:.3f} [{pr['q1']:.2f}, {pr['q3']:.2f}]",
            f"{r['cpu_ratio']:.3f}",
            mem,
            growth,
            f"{r['loss_abs_diff']:.1e}",
            f"{r['grad_max_rel_diff']:.1e}",
        )
    console.print(table)
    detail = Table(title="where each rank's step goes (median ms per step)")
    detail_cols = (
        "model",
        "schedule",
        "m",
        "rank",
        "pp compute",
        "pp send post",
        "pp recv",
        "pp other",
        "pl compute",
        "pl comm",
        "pl other",
    )
    for col in detail_cols:
        detail.add_column(col, justify="right")
    for r in rows:
        for k, (a, b) in enumerate(
            zip(r["pipepart_breakdown_s"], r["pipelining_breakdown_s"], strict=True)
        ):
            detail.add_row(
                r["model"],
                _label(r),
                str(r["microbatches"]),
                str(k),
                f"{a['compute'] * 1e3:.1f}",
                f"{a['send'] * 1e3:.1f}",
                f"{a['recv'] * 1e3:.1f}",
                f"{a['other'] * 1e3:.1f}",
                f"{b['compute'] * 1e3:.1f}",
                f"{b['comm'] * 1e3:.1f}",
                f"{b['other'] * 1e3:.1f}",
            )
    console.print(detail)


def main(argv: Sequence[str] | None = None) -> int:
    from rich.progress import Progress

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small cases (CI smoke run)")
    parser.add_argument("--rounds", type=int, default=None, help="timed steps of each runtime")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS runs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args(argv)
    cases = QUICK if args.quick else FULL
    rounds = args.rounds or (2 if args.quick else 20)
    load0 = os.getloadavg()[0]
    started = time.monotonic()
    rows = []
    with Progress(transient=True) as progress:
        task = progress.add_task("cases", total=len(cases))
        for model, ranks, schedule, virtual, m, mode in cases:
            progress.update(task, description=f"{model} {ranks} ranks {schedule} m={m} {mode}")
            rows.append(
                run_case(
                    model,
                    ranks,
                    schedule,
                    virtual,
                    m,
                    mode,
                    quick=args.quick,
                    rounds=rounds,
                    memory=not args.no_memory,
                )
            )
            progress.advance(task)
    load = (load0, os.getloadavg()[0])
    _print(rows, load)
    two = [r for r in rows if r["ranks"] == 2]
    summary = {
        "target_ratio": TARGET,
        "goal_ratio": GOAL,
        "median_paired_ratio_2_ranks": statistics.median(r["paired_ratio"]["median"] for r in two)
        if two
        else None,
        "worst_paired_ratio_2_ranks": max(r["paired_ratio"]["median"] for r in two)
        if two
        else None,
        "median_cpu_ratio_2_ranks": statistics.median(r["cpu_ratio"] for r in two) if two else None,
        "worst_memory_ratio": max(
            (r["memory_ratio"] for r in rows if r["memory_ratio"]), default=None
        ),
        "all_losses_match": all(r["loss_abs_diff"] < 1e-5 for r in rows),
        "max_grad_rel_diff": max(r["grad_max_rel_diff"] for r in rows),
    }
    print(f"summary: {json.dumps(summary)}; {time.monotonic() - started:.0f} s")
    report = {
        "question": "pipepart / torch.distributed.pipelining: step time and peak RSS on the same split",
        "command": "python -m benchmarks.vs_pipelining" + (" --quick" if args.quick else ""),
        "quick": args.quick,
        "machine": _workloads.machine(load),
        "summary": summary,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
