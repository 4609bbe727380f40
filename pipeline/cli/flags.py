"""What the ``pipepart`` sub-commands share: the model and planning flags, and the options they make.

The flags become a `PlanOptions` in one place (`plan_options`), so ``plan``, ``simulate`` and
``run --cuts markers`` read a flag the same way, and no command patches ``args`` afterwards.
Every sub-command's parser comes from `add_command`, which gives it ``--debug`` and ``--json``;
see [Note: --debug anywhere].
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

from partition.algorithms.problem import OBJECTIVES
from partition.devices import Device, parse_devices
from partition.errors import PlanError
from partition.memory import OPTIMIZER_STATES, MemoryModel
from partition.microbatch import DEFAULT_MICROBATCHES
from partition.options import CUTS, MODES, PlanOptions
from partition.plan import Plan
from partition.schedules.names import DEFAULT_SCHEDULE, SCHEDULE_NAMES, canonical_schedule
from partition.solve import ALGORITHMS

__all__ = [
    "add_algorithm_argument",
    "add_command",
    "add_cuts_argument",
    "add_debug_argument",
    "add_model_arguments",
    "add_plan_arguments",
    "console",
    "devices",
    "devices_of_spec",
    "make_plan",
    "meta_model",
    "plan_options",
    "progress",
    "schedule_argument",
]

DEFAULT_DEVICE_SPEC = "cpu"
_PLAN = PlanOptions()
"""The defaults of the planning flags: `PlanOptions`' own, so that a flag left out plans as
`partition.plan_model` does."""


def add_debug_argument(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """``--debug`` on the top parser (``top``: default False) or on a sub-command's (no default).

    [Note: --debug anywhere] ``--debug`` is accepted before the sub-command (``pipepart --debug
    plan gpt``) and after it (``pipepart plan gpt --debug``). argparse copies every attribute of
    a sub-parser's namespace over the top parser's, defaults included, so a sub-parser's
    ``--debug`` defaulting to False would erase a ``--debug`` given before the sub-command. A
    sub-parser's ``--debug`` therefore has no default (``argparse.SUPPRESS``): it sets
    ``args.debug`` only when given, and the top parser's False stands otherwise.
    """
    default = False if top else argparse.SUPPRESS
    parser.add_argument(
        "--debug", action="store_true", default=default, help="show the traceback of an error"
    )


def add_command(
    sub: Any,
    name: str,
    func: Callable[[argparse.Namespace], int],
    *,
    help: str,
    epilog: str,
    json_help: str = "print one JSON object instead of the table",
) -> argparse.ArgumentParser:
    """The parser of sub-command ``name`` (running ``func``) in the sub-parsers ``sub``, with
    its examples (``epilog``), ``--json`` and ``--debug``."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help=json_help)
    add_debug_argument(parser, top=False)
    parser.set_defaults(func=func)
    return parser


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
        default=_PLAN.method,
        help=f"trace route (default {_PLAN.method})",
    )
    parser.add_argument(
        "--leaf",
        action="append",
        default=[],
        metavar="PATH",
        help="keep this submodule as one node (repeatable, globs allowed)",
    )
    parser.add_argument(
        "--modes",
        choices=MODES,
        default=_PLAN.modes,
        help="which modes to trace and plan when the forward reads self.training: both (the "
        "default: cuts valid in both), or the mode the model is in only (the other is refused)",
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
        type=schedule_argument,
        metavar="{" + ",".join(SCHEDULE_NAMES) + ",@FILE}",
        help=f"pipeline schedule (default {DEFAULT_SCHEDULE}), or @FILE: one you write",
    )
    parser.add_argument(
        "--microbatches",
        type=int,
        default=DEFAULT_MICROBATCHES if defaults else None,
        help=f"micro-batches per step (default {DEFAULT_MICROBATCHES})",
    )
    parser.add_argument(
        "--virtual",
        type=int,
        default=_PLAN.virtual,
        help="stages per device for the interleaved schedule (zb-v and dualpipev: 2, set for you)",
    )
    parser.add_argument(
        "--optimizer",
        default=_PLAN.memory.optimizer,
        choices=tuple(OPTIMIZER_STATES),
        help=f"optimizer state to budget for (default {_PLAN.memory.optimizer})",
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
        default=_PLAN.cuts,
        choices=CUTS,
        help="who places the cuts: the partitioner (default; pipe_split() markers are ignored), "
        "or the model's torch.distributed.pipelining pipe_split() markers: one stage per "
        "marker-separated segment, so the device count must equal markers + 1 (times --virtual)",
    )


def add_algorithm_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--algorithm",
        default=_PLAN.algorithm,
        choices=ALGORITHMS,
        help=f"partitioner (default {_PLAN.algorithm})",
    )
    parser.add_argument(
        "--objective",
        default=None,
        choices=OBJECTIVES,
        help="what the optimal partitioner minimises: the slowest stage (bottleneck), or the "
        f"schedule's predicted step (step; the default of --auto); default {_PLAN.objective}",
    )


def devices(args: argparse.Namespace, count: int | None = None) -> list[Device]:
    """The devices of ``--device-spec`` and ``--devices`` (or ``count``, e.g. the ranks)."""
    spec = args.device_spec or DEFAULT_DEVICE_SPEC
    return devices_of_spec(spec, count or args.devices, repeat=4)


def devices_of_spec(spec: str, count: int | None, *, repeat: int | None = None) -> list[Device]:
    """The devices of a ``--device-spec``: several specs separated by ``;`` as given (``count``,
    when given, must be their number); one spec repeated ``count`` times, else ``repeat`` times."""
    specs = [s for s in spec.split(";") if s.strip()]
    return parse_devices(specs, count if len(specs) > 1 else count or repeat)


_PLAN_FLAGS = {  # a `PlanOptions` field: the flag that sets it
    "schedule": "schedule",
    "microbatches": "microbatches",
    "virtual": "virtual",
    "algorithm": "algorithm",
    "objective": "objective",
    "cuts": "cuts",
    "method": "trace",
    "leaf_modules": "leaf",
    "profile": "profile",
    "modes": "modes",
}
_MEMORY_FLAGS = {"optimizer": "optimizer", "master_weights": "master_weights"}


def plan_options(args: argparse.Namespace, **given: Any) -> PlanOptions:
    """The `PlanOptions` of the flags; a flag the command lacks or left ``None`` takes
    `PlanOptions`' default, and the fields ``given`` win over the flags."""

    def flags(table: dict[str, str]) -> dict[str, Any]:
        values = {field: getattr(args, flag, None) for field, flag in table.items()}
        return {field: value for field, value in values.items() if value is not None}

    fields = flags(_PLAN_FLAGS)
    if fields.get("schedule") == "auto":  # --schedule auto: the search picks it (pipeline.cli.auto)
        del fields["schedule"]
    if "memory" not in given:
        fields["memory"] = MemoryModel(**flags(_MEMORY_FLAGS))
    return PlanOptions(**{**fields, **given})


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


def schedule_argument(value: str) -> str:
    """``--schedule``: a name, ``auto`` (``plan`` searches it), or ``@FILE`` read now (its text,
    canonical), so that a bad name or file fails before anything is traced; see
    [Note: a schedule a user writes]."""
    if value.strip().lower() == "auto":
        return "auto"
    try:
        return canonical_schedule(value)
    except PlanError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
