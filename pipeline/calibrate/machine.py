"""One calibration of this machine: what `compute` and `link` measure, as a device spec file.

[Note: what a calibrated spec claims]
``flops`` is the largest matmul's sustained rate (what a compute-bound node runs at; smaller
matmuls are slower, and their rates are kept under ``measured``); ``memory`` is what the device
holds (a GPU's total memory, or this machine's RAM); ``bandwidth`` and ``latency`` are the
measured link between two ranks on the backend in use; the fixed costs are per traced node and per
action (see `pipeline.calibrate.compute.dispatch_costs`). What is measured but not yet priced by
the cost model (elementwise throughput, the smaller matmuls) is recorded for people to read.
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
from pipeline.calibrate.compute import dispatch_costs, elementwise_rate, matmul_rates
from pipeline.calibrate.link import measure_link

__all__ = ["Calibration", "calibrate"]

_SIZES = {"cpu": (128, 256, 512, 1024), "cuda": (1024, 2048, 4096, 8192)}
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
) -> Calibration:
    """Measure this machine; see [Note: what a calibrated spec claims].

    Args:
        device: ``"cpu"`` or ``"cuda"`` (default: cuda when available).
        backend: the link's backend (default: the runtime's, nccl with 2 GPUs, else gloo).
        link: measure the link between two ranks (else the spec keeps the cpu preset's).
        threads: CPU threads while measuring compute: 1, as each rank `pipepart run` spawns
            uses (give what your ranks use under torchrun).
        progress: called with a line before each measurement.
    """
    start = time.monotonic()
    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kind = where.type
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        progress(f"matmul throughput at {', '.join(map(str, _SIZES[kind]))} ({kind}, fp32)")
        rates = matmul_rates(where, _SIZES[kind])
        progress("elementwise throughput")
        elementwise = elementwise_rate(where, _ELEMENTWISE[kind])
        progress("fixed cost per node and per action")
        fixed = dispatch_costs(where)
    finally:
        torch.set_num_threads(before)
    measured: dict[str, Any] = {
        "matmul_flops": {str(n): r for n, r in rates.items()},
        "elementwise_bytes_per_s": elementwise,
        "threads": threads,
    }
    bandwidth, latency = 10e9, 50e-6
    if link:
        progress("point-to-point latency and bandwidth between 2 ranks")
        costs = measure_link(backend)
        bandwidth, latency = costs.bandwidth, costs.latency
        measured["link"] = {"backend": costs.backend, "latency": latency, "bandwidth": bandwidth}
    name = torch.cuda.get_device_name(where) if kind == "cuda" else f"cpu-{platform.node()}"
    spec = Device(
        name=name.replace(",", " ").replace(";", " "),
        memory=_memory(where),
        flops=rates[max(rates)],
        bandwidth=bandwidth,
        latency=latency,
        dispatch_forward=fixed.forward,
        dispatch_backward=fixed.backward,
        action_overhead=fixed.action,
    )
    return Calibration(spec, measured, platform.node(), time.monotonic() - start)
