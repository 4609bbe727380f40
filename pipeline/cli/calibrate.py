"""``pipepart calibrate``: measure this machine and write a device spec (``--device-spec @FILE``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from partition.units import format_size, format_time
from pipeline.cli.flags import add_command, console

__all__ = ["register"]

_EPILOG = """Measures, on this machine: matmul throughput (square, and a training linear layer)
and elementwise throughput (with --threads CPU threads: 1, as each rank of `pipepart run` uses),
the fixed cost of an operation and of a forward-and-backward action, an optimizer step (SGD) and
the fixed work of a training step, and between two ranks on the backend in use (gloo, or nccl
with two GPUs) the point-to-point latency and bandwidth, each rank's cost per message and the
step's all-reduce. Writes a device spec that every command taking --device-spec reads as @FILE,
with overrides after it (@FILE,mem=8GiB). The presets (cpu, h100, ...) are published figures,
not measurements. Under a minute on a CPU.

examples:
  pipepart calibrate --out calib.json
  pipepart plan gpt --size toy --devices 2 --device-spec @calib.json
  pipepart calibrate --out calib.json --no-link --json
"""


def register(sub: Any) -> None:
    """Add ``calibrate`` to the sub-command parsers ``sub``."""
    parser = add_command(
        sub,
        "calibrate",
        _cmd_calibrate,
        help="measure this machine and write a device spec for --device-spec @FILE",
        epilog=_EPILOG,
        json_help="print the spec file's JSON object",
    )
    parser.add_argument("--out", default="calib.json", help="the spec file to write")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available"
    )
    parser.add_argument("--backend", choices=("gloo", "nccl"), default=None)
    parser.add_argument(
        "--no-link", action="store_true", help="skip the two-rank link (keep the cpu preset's)"
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads while computing")


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from partition.errors import InputError
    from pipeline.calibrate import calibrate

    if args.threads < 1:
        raise InputError(f"--threads must be at least 1, got {args.threads}")

    def progress(line: str) -> None:
        print(f"pipepart calibrate: {line}", file=sys.stderr, flush=True)

    result = calibrate(args.device, args.backend, not args.no_link, args.threads, progress)
    path = result.save(args.out)
    if args.json:
        print(json.dumps({**result.to_dict(), "out": str(path)}))
        return 0
    d = result.device
    out = console()
    out.print(f"[bold]{d.name}[/] measured in {result.seconds:.1f} s, written to {path}")
    rows = [
        ("memory", format_size(d.memory)),
        ("training matmul", f"{d.flops / 1e9:.1f} GFLOP/s"),
        *[
            (f"  matmul {n}", f"{r / 1e9:.1f} GFLOP/s")
            for n, r in result.measured["matmul_flops"].items()
        ],
        ("elementwise", f"{result.measured['elementwise_bytes_per_s'] / 1e9:.1f} GB/s"),
        ("per node, forward", format_time(d.dispatch_forward)),
        ("per node, backward", format_time(d.dispatch_backward)),
        ("per action", format_time(d.action_overhead)),
        ("per message", format_time(d.message_overhead)),
        ("per step", format_time(d.step_overhead)),
        ("optimizer update", f"{d.update_rate / 1e9:.2f} GB/s"),
        ("link latency", format_time(d.latency)),
        ("link bandwidth", f"{d.bandwidth / 1e9:.2f} GB/s"),
    ]
    for what, value in rows:
        out.print(f"  {what:<20} {value}")
    out.print(f"use it: --device-spec @{path}")
    return 0
