"""What a link between two ranks costs: latency, bandwidth, each rank's cost per message, and a
step's all-reduce, on the backend in use.

Two ranks are spawned (gloo on CPUs, NCCL on GPUs, as the runtime would choose) and exchange
tensors, each measurement the median of its repeats (see [Note: timing a kernel] in
`pipeline.calibrate.compute`):

* **one way** — a one-element message's round trip over two, through the runtime's own
  `pipeline.runtime.comm.Transport` (receives posted ahead, as a step posts them): what a
  message costs a schedule end to end;
* **message** — what each rank spends on one message: the sender's ``Transport.send`` while the
  receive is already posted, and the receiver's ``Transport.recv`` of data already there (which
  posts the next receive ahead), averaged over the two. The link's ``latency`` is what remains
  of the one-way time, ``one_way - 2 * message`` (see `Device.message_overhead`);
* **bandwidth** — a 16 MiB tensor's one-way trip, less a one-element one's, over its bytes;
* **all-reduce** — one float, the non-finite check each step makes (`pipeline.runtime.finite`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from partition.errors import PipepartError
from partition.wires import TensorSpec
from pipeline.launch.spawn import spawn_ranks
from pipeline.runtime.comm import BufferPool, Link, Transport
from pipeline.runtime.device import default_backend, stage_device

__all__ = ["LinkCosts", "measure_link"]

_SMALL, _LARGE = 1, 4 * 2**20  # elements (float32): 4 bytes and 16 MiB


@dataclass(frozen=True)
class LinkCosts:
    """One link's fixed costs per message and per step, and its bandwidth."""

    backend: str
    latency: float
    """Seconds of a message on the link, one way, the ranks' own `message` costs taken out."""
    bandwidth: float
    """Bytes per second of a large message, one way, its latency taken out."""
    message: float = 0.0
    """Seconds each rank spends per message (posting it, taking it in)."""
    one_way: float = 0.0
    """Seconds of a one-element message through the runtime's transport, end to end."""
    allreduce: float = 0.0
    """Seconds of a one-element all-reduce between the two ranks."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        _sync(device)
        if k:  # the first round trip sets the connection up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _links() -> tuple[Link, Link]:
    spec = (TensorSpec("x", (_SMALL,), "float32"),)
    grad = (TensorSpec("grad_x", (_SMALL,), "float32"),)
    return Link("activation", 0, 1, 0, 1, spec), Link("gradient", 1, 0, 1, 0, grad)


def _transport_round_trips(repeats: int, device: torch.device) -> float:
    """A one-element message's round trip through `Transport`, receives posted ahead."""
    rank = dist.get_rank()
    there, back = _links()
    mine, theirs = (back, there) if rank == 0 else (there, back)
    pool = BufferPool(mine.specs, device, 2)
    transport = Transport(rank)
    transport.expect([(mine, pool, range(repeats + 1))])
    x = torch.zeros(_SMALL, device=device)
    times = []
    for k in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        if rank == 0:
            transport.send(theirs, [x], k)
            pool.release(transport.recv(mine, k))
        else:
            pool.release(transport.recv(mine, k))
            transport.send(theirs, [x], k)
        _sync(device)
        if k:
            times.append(time.perf_counter() - start)
    transport.flush()
    return statistics.median(times)


def _message_costs(repeats: int, device: torch.device) -> float:
    """Rank 0's ``send`` with the receive posted, rank 1's ``recv`` of data already there: their
    medians' mean."""
    rank = dist.get_rank()
    link, _ = _links()
    pool = BufferPool(link.specs, device, 2)
    transport = Transport(rank)
    if rank == 1:
        transport.expect([(link, pool, range(repeats))])
    x = torch.zeros(_SMALL, device=device)
    times = []
    for k in range(repeats):
        dist.barrier()  # rank 1's receive is posted
        if rank == 0:
            start = time.perf_counter()
            transport.send(link, [x], k)
            times.append(time.perf_counter() - start)
            transport.flush()
        dist.barrier()  # the data is there
        if rank == 1:
            time.sleep(1e-3)  # and taken off the socket
            start = time.perf_counter()
            pool.release(transport.recv(link, k))
            times.append(time.perf_counter() - start)
    mine = torch.tensor([statistics.median(times)], dtype=torch.float64)
    both = [torch.zeros(1, dtype=torch.float64) for _ in range(2)]
    dist.all_gather(both, mine)  # gloo and nccl alike: float64 on the CPU, or on the device
    return float(sum(t.item() for t in both)) / 2.0


def _allreduce(repeats: int, device: torch.device) -> float:
    flag = torch.zeros(1, device=device)
    times = []
    for k in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        float(flag)  # the verdict is read on the host
        if k:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _measure(repeats: int) -> dict[str, float]:
    torch.set_num_threads(1)
    device = stage_device(None)
    timed: dict[str, Callable[[], float]] = {
        "small": lambda: _round_trips(_SMALL, repeats, device) / 2.0,
        "large": lambda: _round_trips(_LARGE, max(repeats // 10, 3), device) / 2.0,
        "one_way": lambda: _transport_round_trips(repeats, device) / 2.0,
        "message": lambda: _message_costs(repeats, device),
        "allreduce": lambda: _allreduce(repeats, device),
    }
    return {name: measure() for name, measure in timed.items()}


def measure_link(
    backend: str | None = None, repeats: int = 50, timeout: float = 120.0
) -> LinkCosts:
    """Latency, bandwidth, per-message and all-reduce costs between two new ranks on
    ``backend`` (the runtime's default if None); see the module docstring.

    Raises:
        PipepartError: when the two ranks fail (the rank's error quoted).
    """
    outcomes = spawn_ranks(
        _measure, 2, (repeats,), timeout=timeout, backend=backend or default_backend(2)
    )
    if not all(o.ok for o in outcomes):
        failed = next(o for o in outcomes if not o.ok)
        raise PipepartError(f"measuring the link failed: {failed.describe()}")
    m = outcomes[0].value
    used = backend or default_backend(2)
    bandwidth = _LARGE * 4 / max(m["large"] - m["small"], 1e-9)
    message = min(m["message"], m["one_way"] / 2.0)  # never more than the whole trip
    return LinkCosts(
        used,
        latency=m["one_way"] - 2.0 * message,
        bandwidth=bandwidth,
        message=message,
        one_way=m["one_way"],
        allreduce=m["allreduce"],
    )
