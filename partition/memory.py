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
               ZB-V,       min(k - s, m)            (k = 2p stages, V placement: rank r holds
               DualPipeV                            stages r and 2p-1-r, 2p + 1 micro-batches of
                                                    the two at m >= 2p; 1F1B's rank 0 holds p of
                                                    a stage twice their size)
               interleaved no closed form: the schedule's own count; as a bound
                           the bound min(m, 2 (p - r - 1) + (v - 1) p + 1) on rank r = s mod p
                           (Megatron's warm-up plus one, all of which one chunk may hold);
                           see `partition.schedules.inflight`
    c_in     bytes of one micro-batch's activations received from the previous stage, and
    c_out    bytes of one micro-batch's gradients received from the next stage (receive buffers).

All byte counts are per micro-batch of the planned size.

[Note: recompute]
With ``recompute`` (activation checkpointing of the whole stage, as the runtime's
``PipelineOptions.recompute`` runs it) a stage saves only its input for each micro-batch in
flight, and the activations of the one micro-batch whose backward is running::

    memory(s) = kappa * W + V + A + inflight(s) * c_in + (c_in + c_out)

and every backward first runs the forward again: the stage's time adds its forward FLOPs (and
its operations' forward dispatch). `partition.algorithms.problem.Costs` prices both, so the
partitioner and the plans see the trade; `partition.planning.auto` searches it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from partition.errors import PlanError

__all__ = ["OPTIMIZER_STATES", "REDUCTIONS", "MemoryModel", "replicated_memory"]

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
    recompute: bool = False
    """Recompute each stage's forward in its backward (the runtime's ``recompute``): a stage
    keeps its input per micro-batch in flight and one micro-batch's activations at a time, and
    its backward runs the forward again. See [Note: recompute]."""

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


REDUCTIONS = ("ddp", "fsdp")
"""How replicas of a pipeline reduce their gradients (``--dp-reduce``); see [Note: memory with
replicas]."""


def replicated_memory(
    parts: Mapping[str, float], param_bytes: float, dp: int, reduction: str
) -> float:
    """Bytes per device of a stage with ``dp`` replicas, from its plan's memory ``parts``
    (``weights``, ``gradients``, ``optimizer``, ``activations``, ``buffers``, as in
    ``StagePlan.memory``) and the bytes of its parameters; see [Note: memory with replicas].

    [Note: memory with replicas]
    Every replica holds the whole stage (weights, activations, receive buffers) on its own
    device; what the reduction adds or divides:

    - ``ddp`` (pipepart's bucketed all-reduce, `pipeline.parallel.reduce`): the plan's memory,
      plus one flat copy of the gradients, in which they are all-reduced (every bucket is in
      flight at once, so that the reduction overlaps the backward).
    - ``fsdp`` (FSDP2 ``fully_shard`` over dp with ``reshard_after_forward=False``, as torchtitan
      runs it under a pipeline: no all-gather per micro-batch): the gradients and the optimizer
      state are sharded, ``1/dp`` each; but the unsharded parameters stay gathered from a
      stage's first forward to its last backward, beside their shard, and the unsharded
      gradients accumulate over the micro-batches until the reduce-scatter at the stage's last
      backward. At that peak a device holds ``W (1 + 1/dp)`` of parameters, ``G (1 + 1/dp)`` of
      gradients and ``O / dp`` of optimizer state: sharding pays for the optimizer state, so it
      saves memory where that state dominates (Adam, fp32 master weights) and ``dp`` is large.
    """
    if reduction not in REDUCTIONS:
        raise PlanError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    if dp < 1:
        raise PlanError(f"dp must be at least 1, got {dp}")
    total = sum(v for k, v in parts.items() if k != "total")
    gradients, optimizer = parts.get("gradients", 0.0), parts.get("optimizer", 0.0)
    if dp == 1 or gradients == 0.0:  # one pipeline, or nothing to reduce (inference)
        return total
    if reduction == "ddp":
        return total + gradients
    shard = 1.0 / dp
    return total + (param_bytes + gradients) * shard - optimizer * (1.0 - shard)
