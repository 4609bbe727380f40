"""What one device computes: matmul and elementwise throughput, and fixed costs per op and action.

[Note: timing a kernel]
Each measurement runs its work once to warm up, then repeats it for a time budget and takes the
median of the repeats (the machine is shared: a mean would carry the slowest outliers). On a CUDA
device every repeat is bracketed by ``torch.cuda.synchronize`` so that the time is the kernel's,
not the launch's.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["DispatchCosts", "dispatch_costs", "elementwise_rate", "matmul_rates", "median_time"]


def median_time(fn: Callable[[], object], device: torch.device, budget: float = 0.2) -> float:
    """Median seconds of ``fn()`` over repeats filling ``budget`` seconds (at least 5, at most
    1000); see [Note: timing a kernel]."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times: list[float] = []
    deadline = time.perf_counter() + budget
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 1000):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_rates(
    device: torch.device, sizes: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> dict[int, float]:
    """Sustained FLOP/s of an ``n x n @ n x n`` matmul for each ``n`` in ``sizes``."""
    rates: dict[int, float] = {}
    warm = torch.randn(sizes[0], sizes[0], device=device, dtype=dtype)
    median_time(lambda: warm @ warm, device, budget=0.1)  # thread pools and allocator up
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        rates[n] = 2.0 * n**3 / median_time(functools.partial(torch.matmul, a, b), device)
    return rates


def elementwise_rate(device: torch.device, numel: int, dtype: torch.dtype = torch.float32) -> float:
    """Bytes per second an elementwise op moves (one read and one write of ``numel`` elements):
    what a memory-bound node (activation, norm, add) runs at."""
    x = torch.randn(numel, device=device, dtype=dtype)
    seconds = median_time(lambda: x.mul_(1.0), device)
    return 2.0 * numel * x.element_size() / seconds


class DispatchCosts:
    """Fixed seconds that do not scale with the work: per traced node and per action."""

    def __init__(self, forward: float, backward: float, action: float) -> None:
        self.forward = forward
        """Seconds of a forward node on a tensor so small that its kernel costs nothing."""
        self.backward = backward
        """Seconds of that node's backward."""
        self.action = action
        """Seconds of one forward-and-backward action on top of its nodes (autograd's set-up)."""


class _Chain(nn.Module):
    def __init__(self, length: int) -> None:
        super().__init__()
        self.length = length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.length):
            x = x * 1.0001
        return x


def dispatch_costs(device: torch.device, length: int = 200) -> DispatchCosts:
    """The fixed costs of `DispatchCosts`, from chains of ``length`` and of 1 tiny ops, forward
    alone and forward with backward: a long chain's time over its length is the cost per node;
    what a one-node chain costs beyond one node is the action's."""
    x = torch.ones(1, device=device, requires_grad=True)
    long, short = _Chain(length), _Chain(1)

    def forward(chain: nn.Module) -> float:
        with torch.no_grad():
            return median_time(lambda: chain(x), device)

    def both(chain: nn.Module) -> float:
        return median_time(lambda: chain(x).backward(), device)

    fwd_long, both_long = forward(long), both(long)
    fwd_short, both_short = forward(short), both(short)
    per_forward = max(fwd_long - fwd_short, 0.0) / (length - 1)
    per_backward = max(both_long - both_short - (fwd_long - fwd_short), 0.0) / (length - 1)
    action = max(both_short - per_forward - per_backward, 0.0)
    return DispatchCosts(per_forward, per_backward, action)
