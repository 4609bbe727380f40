"""The memory model of a pipeline stage: weights, gradients, optimizer state, activations, buffers.

[Note: stage memory]
For a stage holding nodes ``i .. j-1`` of the linear order, on stage index ``s`` of ``k``::

    memory(s) = kappa * W + V + inflight(s) * A + (c_in + c_out)

    W        bytes of the parameters the stage owns (each parameter once; a tied weight once)
    V        bytes of the buffers it owns (BatchNorm's running statistics, masks, tables): held
             once, with no gradient and no optimizer state, so outside ``kappa``
    kappa    bytes held per byte of parameter, ``MemoryModel.bytes_per_param_byte``:
                 1                 the weights
               + 1                 their gradients
               + states * r        optimizer state (SGD: 0, SGD-momentum: 1, Adam(W): 2 tensors),
                                   r = 4 / element_size with fp32 master weights, else 1
               + 4 / element_size  the fp32 master copy, with ``master_weights=True``
             e.g. bf16 weights, Adam, fp32 master: (2 + 2 + 8 + 4) / 2 = 8 per byte = 16 B/param
    A        bytes autograd saves for backward for one micro-batch (sum over the stage's nodes)
    inflight micro-batches whose forward ran and whose backward has not, at peak:
               GPipe       m                        (all forwards before any backward)
               1F1B        min(k - s, m)            (stage s warms up with k - s - 1 forwards)
               ZB-H1       min(k, m)                (W deferred: every stage holds k)
               interleaved no closed form: the schedule's own count; as a bound
                           the bound min(m, 2 (p - r - 1) + (v - 1) p + 1) on rank r = s mod p
                           (Megatron's warm-up plus one, all of which one chunk may hold);
                           see `partition.schedules.inflight`
    c_in     bytes of one micro-batch's activations received from the previous stage, and
    c_out    bytes of one micro-batch's gradients received from the next stage (receive buffers).

All byte counts are per micro-batch of the planned size.
"""

from __future__ import annotations

from dataclasses import dataclass

from partition.errors import PlanError

__all__ = ["OPTIMIZER_STATES", "MemoryModel"]

OPTIMIZER_STATES: dict[str, int] = {"none": 0, "sgd": 0, "sgd-momentum": 1, "adam": 2, "adamw": 2}
"""Optimizer name -> state tensors it keeps per parameter (``none``: inference, no gradients).
The runtime's optimizers (`pipeline.runtime.optim`) are priced under the same names."""


@dataclass(frozen=True, kw_only=True)
class MemoryModel:
    """What training keeps per parameter byte. See [Note: stage memory]."""

    optimizer: str = "adam"
    """Optimizer whose state is counted: a name in `OPTIMIZER_STATES`."""
    master_weights: bool = False
    """Keep an fp32 master copy and fp32 optimizer state (mixed-precision training)."""

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZER_STATES:
            raise PlanError(
                f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZER_STATES)}"
            )

    def bytes_per_param_byte(self, element_size: float = 4.0) -> float:
        """``kappa``: bytes held per byte of parameter in the model's dtype."""
        if element_size <= 0:
            raise PlanError(f"element size must be positive, got {element_size}")
        fp32_ratio = 4.0 / element_size
        state_ratio = fp32_ratio if self.master_weights else 1.0
        kappa = 1.0  # weights
        if self.optimizer != "none":
            kappa += 1.0  # gradients
        kappa += OPTIMIZER_STATES[self.optimizer] * state_ratio
        if self.master_weights:
            kappa += fp32_ratio
        return kappa
