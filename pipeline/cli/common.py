"""What the ``pipepart`` sub-commands share: the model and planning flags, and the options they make.

The flags become a `PlanOptions` in one place (`plan_options`), so ``plan``, ``simulate`` and
``run --cuts markers`` read a flag the same way, and no command patches ``args`` afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

from partition.devices import Device, parse_devices
from partition.memory import OPTIMIZER_STATES, MemoryModel
from partition.microbatch import DEFAULT_MICROBATCHES
from partition.options import CUTS, PlanOptions
from partition.plan import Plan
from partition.schedules.names import SCHEDULE_NAMES
from partition.solve import ALGORITHMS

__all__ = [
    "add_algorithm_argument",
    "add_cuts_argument",
    "add_model_arguments",
    "add_plan_arguments",
    "console",
    "devices",
    "make_plan",
    "meta_model",
    "plan_options",
    "progress",
]

DEFAULT_DEVICE_SPEC = "cpu"
DEFAULT_SCHEDULE = "1f1b"


def console(stderr: bool = False) -> Any:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, highlight=False, width=None if stream.isatty() else 160)


@contextlib.contextmanager
def progress(enabled: bool) -> Iterator[Callable[[str], None]]:
    """A spinner on stderr while long work runs; yields a callback that updates its text."""
    if not enabled or not sys.stderr.isatty():
        yield lambda message: logging.getLogger("pipepart").info("%s", message)
        return
    with console(stderr=True).status("starting") as status:
        yield lambda message: status.update(message + "…")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        help="a plan file (simulate only), a bundled model (gpt, gpt-tied, skipnet, two-tower), "
        "hf:NAME, or package.module:callable returning (model, inputs[, loss_fn])",
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


def add_plan_arguments(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    """Device, schedule and memory flags; ``defaults=False`` leaves the unset ones ``None`` (so
    ``simulate plan.json`` can tell a flag given from the plan's own value)."""
    parser.add_argument(
        "--devices",
        type=int,
        default=None,
        help="number of pipeline devices (default: as many as specs, else 4)",
    )
    parser.add_argument(
        "--device-spec",
        default=DEFAULT_DEVICE_SPEC if defaults else None,
        help='a preset (h100, h200, a100-40, a100-80, cpu), "mem=16GiB,tflops=100,bw=25GB/s", '
        "or several separated by ';' for a heterogeneous set (default cpu)",
    )
    parser.add_argument(
        "--schedule",
        default=DEFAULT_SCHEDULE if defaults else None,
        choices=SCHEDULE_NAMES,
        help="pipeline schedule (default 1f1b)",
    )
    parser.add_argument(
        "--microbatches",
        type=int,
        default=DEFAULT_MICROBATCHES if defaults else None,
        help=f"micro-batches per step (default {DEFAULT_MICROBATCHES})",
    )
    parser.add_argument(
        "--virtual", type=int, default=1, help="stages per device for the interleaved schedule"
    )
    parser.add_argument(
        "--optimizer",
        default="adam",
        choices=tuple(OPTIMIZER_STATES),
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


def add_cuts_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cuts",
        default="partitioner",
        choices=CUTS,
        help="who places the cuts: the partitioner (default; pipe_split() markers are ignored), "
        "or the model's torch.distributed.pipelining pipe_split() markers: one stage per "
        "marker-separated segment, so the device count must equal markers + 1 (times --virtual)",
    )


def add_algorithm_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--algorithm", default="optimal", choices=ALGORITHMS, help="partitioner (default optimal)"
    )


def devices(args: argparse.Namespace, count: int | None = None) -> list[Device]:
    """The devices of ``--device-spec`` and ``--devices`` (or ``count``, e.g. the ranks)."""
    spec = args.device_spec or DEFAULT_DEVICE_SPEC
    specs = [s for s in spec.split(";") if s.strip()]
    if len(specs) > 1:
        return parse_devices(specs, count or args.devices)
    return parse_devices(specs, count or args.devices or 4)


def plan_options(args: argparse.Namespace, **given: Any) -> PlanOptions:
    """The `PlanOptions` of the flags (a flag left ``None`` takes the default); ``given`` wins."""

    def flag(name: str, default: Any) -> Any:
        value = getattr(args, name, None)
        return default if value is None else value

    fields: dict[str, Any] = {
        "schedule": flag("schedule", DEFAULT_SCHEDULE),
        "microbatches": flag("microbatches", DEFAULT_MICROBATCHES),
        "virtual": flag("virtual", 1),
        "memory": MemoryModel(
            optimizer=flag("optimizer", "adam"), master_weights=flag("master_weights", False)
        ),
        "algorithm": flag("algorithm", "optimal"),
        "cuts": flag("cuts", "partitioner"),
        "method": flag("trace", "auto"),
        "leaf_modules": tuple(flag("leaf", ())),
        "profile": flag("profile", False),
    }
    fields.update(given)
    return PlanOptions(**fields)


def meta_model(args: argparse.Namespace) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """``args.model`` built on meta: the model and its example inputs (nothing allocated)."""
    from partition.models.registry import resolve

    spec = resolve(args.model, size=args.size, batch=args.batch, seq=args.seq)
    with torch.device("meta"):
        model, inputs, kwargs, _, _ = spec.build()
    return model, inputs, kwargs


def make_plan(
    args: argparse.Namespace,
    options: PlanOptions,
    on: list[Device],
    report: Callable[[str], None] | None = None,
) -> Plan:
    """Plan ``args.model`` (built on meta) over the devices ``on`` with ``options``."""
    from partition import plan_model

    if report:
        report(f"building {args.model} on meta")
    model, inputs, kwargs = meta_model(args)
    return plan_model(model, inputs, kwargs, devices=on, options=options, progress=report)
