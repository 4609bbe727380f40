"""What one device computes: matmul and elementwise throughput, and fixed costs per op and action.

[Note: timing a kernel]
Each measurement runs its work once to warm up, then repeats it for a time budget and takes the
median of the repeats (the machine is shared: a mean would carry the slowest outliers). On a CUDA
device every repeat is bracketed by ``torch.cuda.synchronize`` so that the time is the kernel's,
not the launch's.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable

import torch

__all__ = [
    "DispatchCosts",
    "dispatch_costs",
    "elementwise_rate",
    "linear_rate",
    "matmul_rates",
    "median_time",
]


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


def linear_rate(device: torch.device, tokens: int, width: int) -> float:
    """Sustained FLOP/s of training a linear layer ``width -> 4 width`` on ``tokens`` rows: its
    forward and backward, three matmuls of which two read a transposed operand, as a
    transformer's MLP runs them (a square matmul in cache runs faster than that)."""
    layer = torch.nn.Linear(width, 4 * width, device=device)
    x = torch.randn(tokens, width, device=device, requires_grad=True)
    flops = 3 * 2.0 * tokens * width * 4 * width
    return flops / median_time(lambda: layer(x).sum().backward(), device)


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
        """Seconds of a forward operation on tensors so small that its kernel costs nothing; see
        [Note: fixed cost per operation]."""
        self.backward = backward
        """Seconds of that node's backward."""
        self.action = action
        """Seconds of one forward-and-backward action on top of its nodes (autograd's set-up)."""


_SMALL: dict[str, int] = dict(vocab_size=32, block_size=32, n_head=4, n_embd=32, batch=2)


def _tiny_gpt(blocks: int, device: torch.device) -> tuple[Callable[[], torch.Tensor], float]:
    """The bundled GPT at `_SMALL`'s size with ``blocks`` blocks: a forward (and its loss) to
    time, and the operations pipepart's cost model counts in it (`LinearGraph.dispatched`)."""
    from partition.models.examples import GPTConfig, gpt
    from partition.planning.analysis import analyze

    config = GPTConfig(
        vocab_size=_SMALL["vocab_size"],
        block_size=_SMALL["block_size"],
        n_layer=blocks,
        n_head=_SMALL["n_head"],
        n_embd=_SMALL["n_embd"],
    )
    model, args, loss_fn = gpt(config, batch=_SMALL["batch"], seq=_SMALL["block_size"])
    ops = float(analyze(model, args, microbatches=1).graph.dispatched.sum())
    model = model.to(device)
    x = args[0].to(device)
    target = torch.randint(0, _SMALL["vocab_size"], x.shape, device=device)
    return lambda: loss_fn(model(x), target), ops


def dispatch_costs(
    device: torch.device, blocks: tuple[int, ...] = (1, 2, 4, 8), repeats: int = 1
) -> DispatchCosts:
    """The fixed costs of `DispatchCosts`, on a transformer's mix of operations.

    [Note: fixed cost per operation]
    What an operation costs whatever its size depends on the operation: a multiply of one
    element costs a few microseconds of dispatch on a CPU, a linear layer, a layer norm or a
    softmax several times that, attention tens of microseconds. The cost model charges one
    figure per operation, so it is measured on the operations of the models pipepart plans:
    the bundled GPT at width 32 over 2 x 32 tokens (`_SMALL`), where FLOPs cost next to nothing
    and tensors are small but not trivial (an operation's fixed cost grows with its tensors: a
    40 % less at width 8 over 8 tokens, 40 % more over 128), with each count of ``blocks``
    (linear layers, layer norms, attention, GELU, views, adds). A least-squares line
    through (operations, seconds) gives the cost per operation, forward and backward (with
    autograd), as its slope; its intercept beyond the operations (the engine's start, the loss)
    is the action's. A model of other operations (convolutions, lookups) pays other fixed
    costs; `partition.profile` measures a model's own nodes instead. Each model is timed
    ``repeats`` times, in turn, and keeps its least time (see [Note: calibrating a shared
    machine] in `pipeline.calibrate.machine`).
    """
    models = [_tiny_gpt(b, device) for b in blocks]
    ops = [count for _, count in models]
    fwd, bwd = [math.inf] * len(models), [math.inf] * len(models)
    for _ in range(max(repeats, 1)):
        for i, (run, _) in enumerate(models):
            forward, backward = _forward_backward(run, device)
            fwd[i], bwd[i] = min(fwd[i], forward), min(bwd[i], backward)
    fit_forward, fit_backward = _line(ops, fwd), _line(ops, bwd)
    per_forward, per_backward = max(fit_forward[1], 0.0), max(fit_backward[1], 0.0)
    return DispatchCosts(per_forward, per_backward, max(fit_forward[0] + fit_backward[0], 0.0))


def _forward_backward(
    run: Callable[[], torch.Tensor], device: torch.device, budget: float = 0.3
) -> tuple[float, float]:
    """Median seconds of ``run()`` and of its backward, timed in the same repeats."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    run().backward()
    forward: list[float] = []
    backward: list[float] = []
    deadline = time.perf_counter() + budget
    while len(forward) < 5 or (time.perf_counter() < deadline and len(forward) < 1000):
        start = time.perf_counter()
        loss = run()
        sync()
        middle = time.perf_counter()
        loss.backward()
        sync()
        forward.append(middle - start)
        backward.append(time.perf_counter() - middle)
    return statistics.median(forward), statistics.median(backward)


def _line(x: list[float], y: list[float]) -> tuple[float, float]:
    """``(intercept, slope)`` of the least-squares line through the points."""
    slope, intercept = statistics.linear_regression(x, y)
    return intercept, slope
