"""What a link between two ranks costs: latency per message and bandwidth, on the backend in use.

Two ranks are spawned (gloo on CPUs, NCCL on GPUs, as the runtime would choose) and pass a tensor
back and forth: a round trip of a 1-element tensor over two is the latency; the time of a large
tensor's one-way trip, less the latency, over its bytes is the bandwidth. Each size takes the
median of its round trips (see [Note: timing a kernel] in `pipeline.calibrate.compute`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from partition.errors import PipepartError
from pipeline.launch.spawn import spawn_ranks
from pipeline.runtime.device import default_backend, stage_device

__all__ = ["LinkCosts", "measure_link"]

_SMALL, _LARGE = 1, 4 * 2**20  # elements (float32): 4 bytes and 16 MiB


@dataclass(frozen=True)
class LinkCosts:
    """One link's fixed cost per message and its bandwidth."""

    backend: str
    latency: float
    """Seconds of a message of one element, one way."""
    bandwidth: float
    """Bytes per second of a large message, one way, its latency taken out."""


def _round_trips(numel: int, repeats: int, device: torch.device) -> float:
    buf = torch.zeros(numel, device=device)
    rank = dist.get_rank()
    times = []
    for k in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        if rank == 0:
            dist.send(buf, 1)
            dist.recv(buf, 1)
        else:
            dist.recv(buf, 0)
            dist.send(buf, 0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if k:  # the first round trip sets the connection up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _measure(repeats: int) -> tuple[float, float]:
    torch.set_num_threads(1)
    device = stage_device(None)
    small = _round_trips(_SMALL, repeats, device) / 2.0
    large = _round_trips(_LARGE, max(repeats // 10, 3), device) / 2.0
    return small, large


def measure_link(
    backend: str | None = None, repeats: int = 50, timeout: float = 120.0
) -> LinkCosts:
    """Latency and bandwidth between two new ranks on ``backend`` (the runtime's default if None).

    Raises:
        PipepartError: when the two ranks fail (the rank's error quoted).
    """
    outcomes = spawn_ranks(
        _measure, 2, (repeats,), timeout=timeout, backend=backend or default_backend(2)
    )
    if not all(o.ok for o in outcomes):
        failed = next(o for o in outcomes if not o.ok)
        raise PipepartError(f"measuring the link failed: {failed.describe()}")
    small, large = outcomes[0].value
    used = backend or default_backend(2)
    bytes_ = _LARGE * 4
    return LinkCosts(used, small, bytes_ / max(large - small, 1e-9))
