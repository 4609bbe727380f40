"""One calibration of this machine: what `compute` and `link` measure, as a device spec file.

[Note: what a calibrated spec claims]
``flops`` is a training matmul's sustained rate: a linear layer's forward and backward at a
transformer's size (on a CPU 256 tokens of width 512; square matmuls run faster in cache, smaller
ones slower: their rates are kept under ``measured``); ``memory`` is what the device
holds (a GPU's total memory, or this machine's RAM); ``bandwidth`` and ``latency`` are the
measured link between two ranks on the backend in use, ``latency`` net of each rank's own
``message_overhead`` (see `pipeline.calibrate.link`); the fixed costs are per traced node and per
action (see `pipeline.calibrate.compute.dispatch_costs`), and per step: ``step_overhead`` is the
step's fixed work on a rank and its all-reduce, ``update_rate`` the optimizer's (see
`pipeline.calibrate.step`). What is measured but not yet priced by the cost model (elementwise
throughput, the smaller matmuls) is recorded for people to read.

[Note: calibrating a shared machine]
Other work on the machine only ever slows a measurement, and a fixed cost found as a difference
of two times (a slope, an intercept) is thrown either way by it. So each compute measurement is
taken ``repeats`` times, in turn: a throughput keeps its highest reading, a time its least, and
the fixed costs are derived from those least times.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from partition.devices import SPEC_FORMAT, Device
from pipeline.calibrate.compute import dispatch_costs, elementwise_rate, linear_rate, matmul_rates
from pipeline.calibrate.link import measure_link
from pipeline.calibrate.step import TENSORS, step_costs

__all__ = ["Calibration", "calibrate"]

_SIZES = {"cpu": (128, 256, 512, 1024), "cuda": (1024, 2048, 4096, 8192)}
_LINEAR = {"cpu": (256, 512), "cuda": (8192, 4096)}  # (tokens, width) of a training matmul
_ELEMENTWISE = {"cpu": 2**25, "cuda": 2**28}  # 128 MiB and 1 GiB of fp32: past every cache


@dataclass(frozen=True)
class Calibration:
    """A device as measured, and every measurement behind it."""

    device: Device
    measured: dict[str, Any] = field(default_factory=dict)
    host: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The spec file's JSON: ``format``, ``device`` (what ``@FILE`` reads), ``measured``."""
        return {
            "format": SPEC_FORMAT,
            "version": 1,
            "device": self.device.to_dict(),
            "measured": self.measured,
            "host": self.host,
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(self.seconds, 1),
        }

    def save(self, path: str | Path) -> Path:
        """Write the spec file atomically; returns its path."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)
        return path


def _memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def calibrate(
    device: str | None = None,
    backend: str | None = None,
    link: bool = True,
    threads: int = 1,
    progress: Callable[[str], None] = lambda _: None,
    repeats: int = 3,
) -> Calibration:
    """Measure this machine; see [Note: what a calibrated spec claims].

    Args:
        device: ``"cpu"`` or ``"cuda"`` (default: cuda when available).
        backend: the link's backend (default: the runtime's, nccl with 2 GPUs, else gloo).
        link: measure the link between two ranks (else the spec keeps the cpu preset's).
        threads: CPU threads while measuring compute: 1, as each rank `pipepart run` spawns
            uses (give what your ranks use under torchrun).
        progress: called with a line before each measurement.
        repeats: how many times the compute measurements run (see [Note: calibrating a
            shared machine]).
    """
    start = time.monotonic()
    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kind = where.type
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    times = f", {repeats} times" if repeats > 1 else ""
    try:
        progress(f"matmul throughput at {', '.join(map(str, _SIZES[kind]))} ({kind}, fp32){times}")
        runs = [matmul_rates(where, _SIZES[kind]) for _ in range(max(repeats, 1))]
        rates = {n: max(r[n] for r in runs) for n in runs[0]}
        tokens, width = _LINEAR[kind]
        progress(f"training matmul throughput ({tokens} x {width} -> {4 * width}){times}")
        flops = max(linear_rate(where, tokens, width) for _ in range(repeats))
        progress(f"elementwise throughput{times}")
        elementwise = max(elementwise_rate(where, _ELEMENTWISE[kind]) for _ in range(repeats))
        progress(f"fixed cost per operation and per action{times}")
        fixed = dispatch_costs(where, repeats=repeats)
        progress(f"optimizer step and fixed cost per training step{times}")
        step = step_costs(where, repeats=repeats)
    finally:
        torch.set_num_threads(before)
    measured: dict[str, Any] = {
        "matmul_flops": {str(n): r for n, r in rates.items()},
        "linear_flops": {"tokens": tokens, "width": width, "flops": flops},
        "elementwise_bytes_per_s": elementwise,
        "threads": threads,
        "step": {
            "optimizer": "sgd",
            "tensors": TENSORS,
            "update_bytes_per_s": step.update_rate,
            "update_fixed": step.update_fixed,
            "clear": step.clear,
            "check": step.check,
        },
    }
    bandwidth, latency, message, allreduce = 10e9, 50e-6, 0.0, 0.0
    if link:
        progress("point-to-point latency, bandwidth and per-message cost between 2 ranks")
        costs = measure_link(backend)
        bandwidth, latency = costs.bandwidth, costs.latency
        message, allreduce = costs.message, costs.allreduce
        measured["link"] = {
            "backend": costs.backend,
            "latency": latency,
            "bandwidth": bandwidth,
            "message": message,
            "one_way": costs.one_way,
            "allreduce": allreduce,
        }
    name = torch.cuda.get_device_name(where) if kind == "cuda" else f"cpu-{platform.node()}"
    spec = Device(
        name=name.replace(",", " ").replace(";", " "),
        memory=_memory(where),
        flops=flops,
        bandwidth=bandwidth,
        latency=latency,
        dispatch_forward=fixed.forward,
        dispatch_backward=fixed.backward,
        action_overhead=fixed.action,
        message_overhead=message,
        step_overhead=step.fixed + allreduce,
        update_rate=step.update_rate,
    )
    return Calibration(spec, measured, platform.node(), time.monotonic() - start)
