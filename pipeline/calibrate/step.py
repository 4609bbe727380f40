"""What a training step costs beyond its schedule, on one rank: the optimizer's update per
parameter byte, and the fixed work every step does (clearing gradients, the non-finite check).

[Note: a step's costs as calibrated]
After its schedule a rank clears nothing, checks its gradients (`pipeline.runtime.finite`), meets
the others in one all-reduce, and steps its optimizer (`pipeline.runtime.update`); the next step
clears the gradients first. The optimizer is timed on `TENSORS` parameters at two sizes, so that
``time = fixed + bytes / rate`` separates what it pays per tensor from what it streams; the check
and the clearing are timed on the same tensors with the runtime's own functions. SGD is the
optimizer timed (``pipepart run``'s default, and the benchmarks'); an Adam step streams about
four times the bytes. The fixed part holds `TENSORS` tensors' worth of per-tensor work: a GPT
block has 12, so it is about right for a few blocks per rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.calibrate.compute import median_time
from pipeline.runtime.finite import _max_abs

__all__ = ["TENSORS", "StepCosts", "step_costs"]

TENSORS = 64
"""Parameter tensors per rank that the fixed costs are measured on."""
_SMALL, _LARGE = 256, 2**16  # elements per tensor: 64 KiB and 16 MiB in all (float32)


@dataclass(frozen=True)
class StepCosts:
    """A step's costs beyond its schedule, on one rank."""

    update_rate: float
    """Parameter bytes per second of an SGD step."""
    update_fixed: float
    """Seconds of an SGD step on `TENSORS` tensors, beyond their bytes."""
    clear: float
    """Seconds clearing `TENSORS` gradients."""
    check: float
    """Seconds of the non-finite check's local part on `TENSORS` gradients (no all-reduce)."""

    @property
    def fixed(self) -> float:
        """The seconds every step pays whatever its parameters' bytes (the all-reduce apart)."""
        return self.update_fixed + self.clear + self.check


def _parameters(numel: int, device: torch.device) -> list[nn.Parameter]:
    params = [nn.Parameter(torch.zeros(numel, device=device)) for _ in range(TENSORS)]
    for p in params:
        p.grad = torch.zeros_like(p)
    return params


def step_costs(device: torch.device, repeats: int = 1) -> StepCosts:
    """Time the optimizer, the clearing and the check, each the least of ``repeats`` medians;
    see [Note: a step's costs as calibrated]."""

    def least(fn: Callable[[], object]) -> float:
        return min(median_time(fn, device) for _ in range(max(repeats, 1)))

    times, sizes = {}, {}
    for numel in (_SMALL, _LARGE):
        params = _parameters(numel, device)
        optimizer = torch.optim.SGD(params, lr=1e-3)
        times[numel] = least(optimizer.step)
        sizes[numel] = TENSORS * numel * 4
    rate = (sizes[_LARGE] - sizes[_SMALL]) / max(times[_LARGE] - times[_SMALL], 1e-9)
    fixed = max(times[_SMALL] - sizes[_SMALL] / rate, 0.0)
    params = _parameters(_SMALL, device)
    grads = [p.grad for p in params]

    def clear() -> None:
        optimizer.zero_grad(set_to_none=True)
        for p, g in zip(params, grads, strict=True):  # back for the next repeat
            p.grad = g

    optimizer = torch.optim.SGD(params, lr=1e-3)
    check = least(lambda: float(_max_abs(grads, device)))  # type: ignore[arg-type]
    return StepCosts(rate, fixed, least(clear), check)
