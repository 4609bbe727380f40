"""The ``pipepart`` command: plan, show, simulate, run and bench.

Every sub-command prints a table for people and, with ``--json``, one JSON object on stdout for
scripts. Errors are one line on stderr and a non-zero exit (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from partition.devices import Device, format_size, format_time, parse_devices
from partition.errors import PipepartError
from partition.memory import OPTIMIZERS, SCHEDULE_NAMES, MemoryModel
from partition.microbatch import DEFAULT_MICROBATCHES
from partition.plan import Plan
from pipeline.check import DEFAULT_TOLERANCE
from pipeline.optim import OPTIMIZERS as RUN_OPTIMIZERS

__all__ = ["main"]

_EPILOG_PLAN = """examples:
  pipepart plan gpt --size small --devices 4
  pipepart plan gpt --size 7b --batch 8 --seq 4096 --devices 8 --device-spec h100 --microbatches 16
  pipepart plan gpt --size 1b --device-spec "h100;h100;a100-40;a100-40" --out plan.json
  pipepart plan mypkg.models:build --devices 2 --device-spec "mem=16GiB,tflops=100,bw=25GB/s" --json
"""

_EPILOG_SIMULATE = """examples:
  pipepart simulate plan.json --png gantt.png
  pipepart simulate plan.json --schedule gpipe --microbatches 32 --json
  pipepart simulate gpt --size 7b --seq 4096 --batch 32 --device-spec h100 --devices 8 --schedule interleaved --virtual 2 --microbatches 16
"""

_EPILOG_RUN = """The model trains on its own weights: the factory's model is built once (torch.manual_seed(--seed),
then the factory), and each rank reads only its stage's tensors; --weights init uses the model's
per-module init rules instead, for a model too big for host memory. A factory giving no loss is
trained on the output's own `loss` if it has one, else on the mean square of its outputs; a
loss_fn(output) of the output alone needs no target.

--check trains the factory's own model in this process the plain way, over the same
micro-batches, and fails (exit code 1) when a loss, gradient, parameter or buffer differs by more
than --check-tol (relative) or is not finite.

examples:
  pipepart run gpt --ranks 2 --steps 3 --check
  pipepart run gpt --ranks 4 --schedule interleaved --virtual 2 --microbatches 8 --json
  pipepart run gpt --ranks 2 --plan plan.json --steps 10 --png run.png
  torchrun --nproc-per-node 4 -m pipeline.cli run gpt --ranks 4 --steps 100   # joins torchrun's group
"""

_EPILOG_BENCH = """examples:
  pipepart bench list
  pipepart bench partitioners --quick --out results/
  pipepart bench vs_pipelining --json
"""

_EPILOG_SHOW = """examples:
  pipepart show plan.json
  pipepart show plan.json --device-spec a100-40 --json
"""


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, highlight=False, width=None if stream.isatty() else 160)


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str], None]]:
    """A spinner on stderr while long work runs; yields a callback that updates its text."""
    if not enabled or not sys.stderr.isatty():
        yield lambda message: logging.getLogger("pipepart").info("%s", message)
        return
    with _console(stderr=True).status("starting") as status:
        yield lambda message: status.update(message + "…")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        help="a plan file (simulate only), a bundled model (gpt, gpt-tied, skipnet, two-tower), hf:NAME, or package.module:callable "
        "returning (model, inputs[, loss_fn])",
    )
    parser.add_argument(
        "--size",
        default="",
        help="size of a bundled or hf model (gpt: toy, small, medium, 1b, 7b, 10b)",
    )
    parser.add_argument(
        "--batch", type=int, default=8, help="rows per step (split into micro-batches); default 8"
    )
    parser.add_argument("--seq", type=int, default=None, help="sequence length for language models")
    parser.add_argument(
        "--trace",
        choices=("auto", "fx", "export"),
        default="auto",
        help="trace route (default auto)",
    )
    parser.add_argument(
        "--leaf",
        action="append",
        default=[],
        metavar="PATH",
        help="keep this submodule as one node (repeatable, globs allowed)",
    )


_PLAN_DEFAULTS = {"device_spec": "cpu", "schedule": "1f1b", "microbatches": DEFAULT_MICROBATCHES}


def _add_plan_arguments(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    """Device, schedule and memory options; ``defaults=False`` leaves unset ones ``None``."""
    given = _PLAN_DEFAULTS if defaults else dict.fromkeys(_PLAN_DEFAULTS)
    parser.add_argument(
        "--devices",
        type=int,
        default=None,
        help="number of pipeline devices (default: as many as specs, else 4)",
    )
    parser.add_argument(
        "--device-spec",
        default=given["device_spec"],
        help='a preset (h100, h200, a100-40, a100-80, cpu), "mem=16GiB,tflops=100,bw=25GB/s", '
        "or several separated by ';' for a heterogeneous set (default cpu)",
    )
    parser.add_argument(
        "--schedule",
        default=given["schedule"],
        choices=SCHEDULE_NAMES,
        help="pipeline schedule (default 1f1b)",
    )
    parser.add_argument(
        "--microbatches",
        type=int,
        default=given["microbatches"],
        help=f"micro-batches per step (default {DEFAULT_MICROBATCHES})",
    )
    parser.add_argument(
        "--virtual", type=int, default=1, help="stages per device for the interleaved schedule"
    )
    parser.add_argument(
        "--optimizer",
        default="adam",
        choices=OPTIMIZERS,
        help="optimizer state to budget for (default adam)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="measure every node on this machine (CUDA if present, else CPU) instead of pricing "
        "FLOPs; the first --device-spec says what kind of device this machine is",
    )
    parser.add_argument(
        "--master-weights",
        action="store_true",
        help="budget fp32 master weights and fp32 optimizer state",
    )


def _devices(args: argparse.Namespace) -> list[Device]:
    specs = [s for s in args.device_spec.split(";") if s.strip()]
    if len(specs) > 1:
        return parse_devices(specs, args.devices)
    return parse_devices(specs, args.devices or 4)


def plan_table(plan: Plan, title: str | None = None) -> Any:
    """A rich table of a plan: one row per stage, the prediction underneath."""
    from rich.table import Table

    bottleneck = plan.bottleneck or 1.0
    table = Table(
        title=title
        or f"{plan.model.class_name} · {plan.schedule} · {plan.microbatches} micro-batches · {plan.algorithm}"
    )
    for column, justify in [
        ("stage", "right"),
        ("device", "left"),
        ("nodes (modules)", "left"),
        ("GFLOPs", "right"),
        ("params", "right"),
        ("memory / capacity", "right"),
        ("time", "right"),
        ("of bottleneck", "right"),
    ]:
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    element = plan.model.param_bytes / plan.model.num_parameters if plan.model.num_parameters else 4
    for stage in plan.stages:
        fits = stage.memory["total"] <= stage.capacity
        memory = f"{format_size(stage.memory['total'])} / {format_size(stage.capacity)}"
        table.add_row(
            str(stage.index),
            stage.device.name,
            f"{stage.start}–{stage.stop - 1} ({stage.first_module or stage.first_node} → {stage.last_module or stage.last_node})",
            f"{stage.flops / 1e9:,.2f}",
            f"{stage.param_bytes / element / 1e6:,.2f} M",
            memory if fits else f"[red]{memory} ✗[/red]",
            format_time(stage.time),
            f"{stage.time / bottleneck:.0%}",
        )
    ratio = plan.bottleneck / plan.perfect_balance if plan.perfect_balance else float("nan")
    table.caption = (
        f"predicted step {format_time(plan.step_time)} · bubble {plan.bubble:.1%} · "
        f"bottleneck stage {plan.bottleneck_stage} at {format_time(plan.bottleneck)}/micro-batch "
        f"({ratio:.3f}× perfect balance)"
        + ("" if plan.fits() else " · [red]does not fit memory[/red]")
    )
    return table


def _plan_summary(plan: Plan) -> dict[str, Any]:
    data = plan.to_dict()
    data["bottleneck"] = plan.bottleneck
    data["bottleneck_stage"] = plan.bottleneck_stage
    data["step_time"] = plan.step_time
    data["bubble"] = plan.bubble
    data["fits"] = plan.fits()
    return data


def _cmd_plan(args: argparse.Namespace) -> int:
    plan = _make_plan(args)
    if args.out:
        plan.save(args.out)
    if args.json:
        print(json.dumps(_plan_summary(plan)))
    else:
        console = _console()
        console.print(plan_table(plan))
        if args.out:
            console.print(f"plan written to {args.out}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    plan = Plan.load(args.plan)
    if args.device_spec:
        plan = _replan_devices(plan, args)
    if args.json:
        print(json.dumps(_plan_summary(plan)))
    else:
        _console().print(plan_table(plan))
    return 0


def _replan_devices(plan: Plan, args: argparse.Namespace) -> Plan:
    """The same split priced on other devices (capacities and times change, nodes do not)."""
    from partition.planner import reprice

    specs = [s for s in args.device_spec.split(";") if s.strip()]
    return reprice(plan, parse_devices(specs, None if len(specs) > 1 else plan.num_ranks))


def _cmd_simulate(args: argparse.Namespace) -> int:
    from partition.planner import simulate_plan

    if args.model.endswith(".json"):
        plan = Plan.load(args.model)
        if args.device_spec is not None:
            plan = _replan_devices(plan, args)
    else:
        for key, value in _PLAN_DEFAULTS.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        args.algorithm = "optimal"
        plan = _make_plan(args)
    schedule = args.schedule or plan.schedule
    microbatches = args.microbatches or plan.microbatches
    result = simulate_plan(plan, schedule=schedule, microbatches=microbatches)
    if args.png:
        from pipeline.gantt import plot_gantt

        plot_gantt(
            result.timeline,
            num_ranks=plan.num_ranks,
            title=f"{plan.model.class_name} · {schedule} · {microbatches} micro-batches · step {format_time(result.step_time)}",
            path=args.png,
        )
    if args.json:
        print(
            json.dumps(
                {
                    "schedule": schedule,
                    "microbatches": microbatches,
                    "ranks": plan.num_ranks,
                    "step_time": result.step_time,
                    "bubble": result.bubble_fraction,
                    "busy_time": list(result.busy_time),
                    "peak_activation_microbatches": list(result.peak_activation_microbatches),
                    "peak_activation_bytes": list(result.peak_activation_bytes or ()),
                    "bottleneck": plan.bottleneck,
                    "png": args.png,
                }
            )
        )
        return 0
    from rich.table import Table

    table = Table(
        title=f"{plan.model.class_name} · {schedule} · {microbatches} micro-batches (simulated)"
    )
    for column in (
        "rank",
        "busy",
        "idle",
        "stages",
        "peak activations (micro-batches)",
        "peak activation memory",
    ):
        table.add_column(column, justify="right")
    stages_of: dict[int, list[int]] = {}
    for stage in plan.stages:
        stages_of.setdefault(stage.index % plan.num_ranks, []).append(stage.index)
    for rank, busy in enumerate(result.busy_time):
        mine = stages_of.get(rank, [])
        table.add_row(
            str(rank),
            format_time(busy),
            f"{1 - busy / result.step_time:.1%}" if result.step_time else "–",
            ", ".join(map(str, mine)),
            ", ".join(str(result.peak_activation_microbatches[s]) for s in mine),
            ", ".join(
                format_size((result.peak_activation_bytes or [0] * plan.num_stages)[s])
                for s in mine
            ),
        )
    table.caption = (
        f"step {format_time(result.step_time)} · bubble {result.bubble_fraction:.1%}"
        + (f" · Gantt chart written to {args.png}" if args.png else "")
    )
    _console().print(table)
    return 0


def _meta_model(args: argparse.Namespace) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """``args.model`` built on meta: the model and its example inputs (nothing allocated)."""
    from partition.registry import resolve

    spec = resolve(args.model, size=args.size, batch=args.batch, seq=args.seq)
    with torch.device("meta"):
        model, inputs, kwargs, _, _ = spec.build()
    return model, inputs, kwargs


def _make_plan(args: argparse.Namespace) -> Plan:
    from partition.planner import plan_model

    devices = _devices(args)
    with _progress(not args.json) as progress:
        progress(f"building {args.model} on meta")
        model, inputs, kwargs = _meta_model(args)
        return plan_model(
            model,
            inputs,
            kwargs,
            devices=devices,
            schedule=args.schedule,
            microbatches=args.microbatches,
            virtual=args.virtual,
            memory=MemoryModel(optimizer=args.optimizer, master_weights=args.master_weights),
            algorithm=args.algorithm,
            method=args.trace,
            leaf_modules=args.leaf,
            profile=args.profile,
            progress=progress,
            cuts=getattr(args, "cuts", "partitioner"),
        )


def _add_cuts_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cuts",
        default="partitioner",
        choices=("partitioner", "markers"),
        help="who places the cuts: the partitioner (default; pipe_split() markers are ignored), "
        "or the model's torch.distributed.pipelining pipe_split() markers: one stage per "
        "marker-separated segment, so the device count must equal markers + 1 (times --virtual)",
    )


def _marker_plan(args: argparse.Namespace, schedule: str, microbatches: int) -> Plan:
    """`pipepart run --cuts markers`: a plan with the model's own cuts, one stage per rank."""
    from partition.planner import plan_model

    if args.plan is not None:
        raise PipepartError("--cuts markers makes the plan itself; leave out --plan")
    model, inputs, kwargs = _meta_model(args)
    return plan_model(
        model,
        inputs,
        kwargs,
        devices=parse_devices("cpu", args.ranks),
        schedule=schedule,
        microbatches=microbatches,
        virtual=args.virtual or 1,
        method=args.trace,
        leaf_modules=args.leaf,
        cuts="markers",
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline.launch import RunOptions, run_pipeline
    from pipeline.runtime import PipelineOptions

    plan = args.plan
    schedule, microbatches = args.schedule, args.microbatches
    if plan is None:  # the defaults when the partitioner plans here
        schedule, microbatches = schedule or "1f1b", microbatches or DEFAULT_MICROBATCHES
    if args.cuts == "markers":
        plan = _marker_plan(args, schedule, microbatches)
        schedule = microbatches = None  # the plan's
    options = RunOptions(
        ranks=args.ranks,
        steps=args.steps,
        optimizer=args.optimizer,
        lr=args.lr,
        check=args.check,
        check_tol=args.check_tol,
        timeout=args.timeout,
        size=args.size,
        batch=args.batch,
        seq=args.seq,
        pipeline=PipelineOptions(
            schedule=schedule,
            microbatches=microbatches,
            virtual=args.virtual,
            seed=args.seed,
            loss_reduction=args.loss,
            max_grad_norm=args.clip,
            recompute=args.recompute,
            batchnorm=args.batchnorm,
            weights=args.weights,
            checkpoint=args.checkpoint,
        ),
    )
    with _progress(not args.json) as progress:
        progress(f"training {args.model} on {args.ranks} ranks")
        result = run_pipeline(args.model, options, plan=plan)
    if not result:  # a torchrun rank other than 0: rank 0 reports
        return 0
    if args.png:
        from pipeline.gantt import plot_gantt
        from pipeline.schedules import Action

        events = [
            (r, a if isinstance(a, Action) else Action.parse(str(a)), s, e)
            for r, a, s, e in result["timeline"]
        ]
        plot_gantt(
            events,
            num_ranks=result["ranks"],
            title=f"{args.model} · measured last step",
            path=args.png,
        )
    if args.json:
        summary = {k: v for k, v in result.items() if k != "timeline"}
        summary["timeline"] = [[r, str(a), s, e] for r, a, s, e in result["timeline"]]
        print(json.dumps(_finite(summary), default=str))
        return _check_status(result)
    from rich.table import Table

    table = Table(title=f"{args.model} on {result['ranks']} ranks")
    table.add_column("step", justify="right")
    table.add_column("time", justify="right")
    table.add_column("loss", justify="right")
    for row in result["steps"]:
        table.add_row(
            str(row["step"]),
            format_time(row["time"]),
            f"{row['loss']:.6f}" if row["loss"] is not None else "–",
        )
    console = _console()
    console.print(table)
    sources = sorted({s for ranks in result.get("weights", {}).values() for s in ranks})
    if sources:
        console.print(f"weights from: {', '.join(sources)} (see --weights)")
    check = result.get("check")
    if check:
        shown = ", ".join(
            f"{k} {_fmt_diff(check[k])}" for k in ("loss", "grads", "params", "buffers")
        )
        verdict = (
            "[green]passed[/green]"
            if check["passed"]
            else f"[red]FAILED[/red]: {'; '.join(check['failures'])}"
        )
        console.print(
            f"largest relative difference from the factory's model trained on one process: "
            f"{shown} (tolerance {check['tolerance']:g}) — {verdict}"
        )
    return _check_status(result)


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float as the string ``"nan"``, ``"inf"`` or ``"-inf"``
    (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return _fmt_diff(value) if not value < 0 else "-inf"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _fmt_diff(d: float) -> str:
    return "nan" if math.isnan(d) else ("inf" if math.isinf(d) else f"{d:.3g}")


def _check_status(result: dict[str, Any]) -> int:
    """1 when --check ran and failed; see [Note: an independent check] in `pipeline.check`."""
    check = result.get("check")
    return 1 if check is not None and not check["passed"] else 0


_BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
"""A checkout's benchmarks/ folder, beside the pipeline package's source tree (not installed)."""


def _benchmarks() -> list[str]:
    """The names of the benchmarks in the checkout's benchmarks/ folder.

    The folder is imported as the package ``benchmarks`` from its own path, so that another
    folder of that name on ``sys.path`` (the user's own) is never taken for it.
    """
    import importlib.util
    import pkgutil

    init = _BENCHMARKS / "__init__.py"
    if not (init.is_file() and (_BENCHMARKS.parent / "pyproject.toml").is_file()):  # a checkout
        raise PipepartError(
            f"no benchmarks/ folder at {_BENCHMARKS}: `pipepart bench` runs the benchmarks of a "
            "source checkout, which an installed pipepart does not include; clone the repository "
            "and run `pip install -e .` in it"
        )
    package = sys.modules.get("benchmarks")
    if package is None:
        spec = importlib.util.spec_from_file_location(
            "benchmarks", init, submodule_search_locations=[str(_BENCHMARKS)]
        )
        assert spec is not None and spec.loader is not None
        package = importlib.util.module_from_spec(spec)
        sys.modules["benchmarks"] = package
        spec.loader.exec_module(package)
    elif [Path(p).resolve() for p in package.__path__] != [_BENCHMARKS]:
        raise PipepartError(
            f"another package named benchmarks is imported ({list(package.__path__)}), not "
            f"{_BENCHMARKS}; run pipepart bench from another directory"
        )
    found = pkgutil.iter_modules([str(_BENCHMARKS)])
    return sorted(m.name for m in found if not m.name.startswith("_"))


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    names = _benchmarks()
    if args.name == "list":
        for name in names:
            module = importlib.import_module(f"benchmarks.{name}")
            first = (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""
            print(f"{name:20s} {first}")
        return 0
    name = args.name.replace("-", "_")
    if name not in names:
        raise PipepartError(
            f"no benchmark {args.name!r}; choose one of {', '.join(names)} (or `pipepart bench list`)"
        )
    module = importlib.import_module(f"benchmarks.{name}")
    out = Path(args.out) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [*(["--quick"] if args.quick else []), "--out", str(out)]
    if not args.json:
        return int(module.main(argv) or 0)
    with contextlib.redirect_stdout(sys.stderr):  # the table goes to stderr, the JSON to stdout
        code = int(module.main(argv) or 0)
    if code == 0:
        print(json.dumps(json.loads(out.read_text())))
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipepart",
        description="Split a PyTorch model into pipeline stages, predict it, and train it across ranks.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    plan = sub.add_parser(
        "plan",
        help="plan a model over devices and print the stages",
        epilog=_EPILOG_PLAN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_arguments(plan)
    _add_plan_arguments(plan)
    plan.add_argument(
        "--algorithm",
        default="optimal",
        choices=("optimal", "uniform", "params", "time"),
        help="partitioner (default optimal)",
    )
    _add_cuts_argument(plan)
    plan.add_argument("--out", default=None, help="write the plan as JSON to this file")
    plan.add_argument(
        "--json", action="store_true", help="print one JSON object instead of the table"
    )
    plan.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    plan.set_defaults(func=_cmd_plan)

    show = sub.add_parser(
        "show",
        help="re-print a saved plan, optionally priced on other devices",
        epilog=_EPILOG_SHOW,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("plan", help="a plan JSON file written by `pipepart plan --out`")
    show.add_argument("--device-spec", default=None, help="price the same split on these devices")
    show.add_argument(
        "--json", action="store_true", help="print one JSON object instead of the table"
    )
    show.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    show.set_defaults(func=_cmd_show)

    simulate = sub.add_parser(
        "simulate",
        help="predict step time, bubble and memory of a plan's schedule; draw its Gantt chart",
        epilog=_EPILOG_SIMULATE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_arguments(simulate)
    _add_plan_arguments(simulate, defaults=False)
    simulate.add_argument("--png", default=None, help="write the Gantt chart to this PNG")
    simulate.add_argument(
        "--json", action="store_true", help="print one JSON object instead of the table"
    )
    simulate.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    simulate.set_defaults(func=_cmd_simulate)

    run = sub.add_parser(
        "run",
        help="train a model on local ranks (or under torchrun) with a pipeline schedule",
        epilog=_EPILOG_RUN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_arguments(run)
    run.add_argument("--ranks", type=int, default=2, help="processes to spawn (default 2)")
    run.add_argument(
        "--plan", default=None, help="a plan JSON file (default: plan now with --schedule)"
    )
    _add_cuts_argument(run)
    run.add_argument(
        "--schedule",
        default=None,
        choices=SCHEDULE_NAMES,
        help="schedule when no plan is given (default 1f1b)",
    )
    run.add_argument(
        "--microbatches",
        type=int,
        default=None,
        help=f"micro-batches per step (default: the plan's, else {DEFAULT_MICROBATCHES})",
    )
    run.add_argument(
        "--virtual", type=int, default=None, help="stages per rank for the interleaved schedule"
    )
    run.add_argument("--steps", type=int, default=3, help="optimizer steps (default 3)")
    run.add_argument(
        "--check",
        action="store_true",
        help="also train the factory's model in one process the plain way and compare: the "
        "largest relative loss / gradient / parameter / buffer differences; exit 1 past --check-tol",
    )
    run.add_argument(
        "--check-tol",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"largest relative difference --check accepts (default {DEFAULT_TOLERANCE:g}, for fp32)",
    )
    run.add_argument(
        "--weights",
        default="auto",
        choices=("auto", "factory", "init"),
        help="where the weights come from: the factory's model built once (factory), the model's "
        "init rules on each rank's tensors only (init), or factory when it fits in host memory "
        "(auto, the default)",
    )
    run.add_argument(
        "--checkpoint",
        default=None,
        help="a whole-model state_dict (.pt) or .safetensors file; each rank reads only its tensors",
    )
    run.add_argument(
        "--seed",
        type=int,
        default=0,
        help="torch.manual_seed before the factory, and the data seed",
    )
    run.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    run.add_argument(
        "--optimizer",
        default="sgd",
        choices=tuple(RUN_OPTIMIZERS),
        help="optimizer (default sgd)",
    )
    run.add_argument(
        "--loss",
        default="mean",
        choices=("mean", "sum"),
        help="how micro-batch losses combine (default mean)",
    )
    run.add_argument("--clip", type=float, default=None, help="clip gradients to this global norm")
    run.add_argument(
        "--recompute", action="store_true", help="recompute activations in the backward"
    )
    run.add_argument(
        "--batchnorm",
        default="microbatch",
        choices=("microbatch", "batch"),
        help="BatchNorm running statistics in train mode: updated per micro-batch (default, as "
        "one process running the micro-batches in turn), or once per step from the whole batch",
    )
    run.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds a rank waits for a peer before failing (default 300)",
    )
    run.add_argument(
        "--png", default=None, help="draw the last step's measured Gantt chart to this PNG"
    )
    run.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: per-step times and losses, --check differences",
    )
    run.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    run.set_defaults(func=_cmd_run)

    bench = sub.add_parser(
        "bench",
        help="run a benchmark from benchmarks/ (`pipepart bench list` names them)",
        epilog=_EPILOG_BENCH,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("name", help="a benchmark's name, or `list`")
    bench.add_argument(
        "--quick", action="store_true", help="the quick mode CI runs (under a minute)"
    )
    bench.add_argument(
        "--json", action="store_true", help="print the benchmark's JSON results on stdout"
    )
    bench.add_argument(
        "--out",
        default=".",
        metavar="DIR",
        help="folder for NAME.json (and its plot, if any); default the current directory",
    )
    bench.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    bench.set_defaults(func=_cmd_bench)
    return parser


def _one_line(message: str) -> str:
    """The line of an error that says what went wrong (a multi-rank report names the failed rank)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return "failed"
    for line in lines:
        if line.startswith("rank ") and "killed by the launcher" not in line:
            return line
    return lines[0]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pipepart`` command."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (PipepartError, OSError) as e:
        if args.debug:
            raise
        print(f"pipepart {args.command}: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pipepart {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
