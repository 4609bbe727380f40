"""The memory model of a pipeline stage: weights, gradients, optimizer state, activations, buffers.

[Note: stage memory]
For a stage holding nodes ``i .. j-1`` of the linear order, on stage index ``s`` of ``k``::

    memory(s) = kappa * W + inflight(s) * A + (c_in + c_out)

    W        bytes of the parameters the stage owns (each parameter once; a tied weight once)
    kappa    bytes held per byte of parameter, ``MemoryModel.bytes_per_param_byte``:
                 1                 the weights
               + 1                 their gradients
               + states * r        optimizer state (SGD: 0, SGD-momentum: 1, Adam: 2 tensors),
                                   r = 4 / element_size with fp32 master weights, else 1
               + 4 / element_size  the fp32 master copy, with ``master_weights=True``
             e.g. bf16 weights, Adam, fp32 master: (2 + 2 + 8 + 4) / 2 = 8 per byte = 16 B/param
    A        bytes autograd saves for backward for one micro-batch (sum over the stage's nodes)
    inflight micro-batches whose forward ran and whose backward has not, at peak:
               GPipe       m                        (all forwards before any backward)
               1F1B        min(k - s, m)            (stage s warms up with k - s - 1 forwards)
               ZB-H1       min(k, m)                (W deferred: every stage holds k)
               interleaved no closed form: the schedule's own count (see below); without it
                           the bound min(m, 2 (p - r - 1) + (v - 1) p + 1) on rank r = s mod p
                           (Megatron's warm-up plus one, all of which one chunk may hold)
    c_in     bytes of one micro-batch's activations received from the previous stage, and
    c_out    bytes of one micro-batch's gradients received from the next stage (receive buffers).

All byte counts are per micro-batch of the planned size.

[Note: in-flight counts come from the schedule]
What a stage holds is a fact about the schedule's action lists, so the one source of it is the
schedule: `pipeline.schedules.peak_inflight`, which the runtime's buffer pools are sized by too.
`partition` cannot import `pipeline` (dependencies run one way), so the solver takes the counts
as a function, `InflightFn`, and `pipeline.planning` passes the schedule's. Without one, the
closed forms above are used (`closed_form_inflight`): equal to the schedule's for GPipe, 1F1B and
ZB-H1 (``tests/pipeline/test_schedules.py`` checks every p <= 8, m <= 32), and for interleaved
an upper bound (a plan that fits, but may leave memory unused).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from partition.errors import PlanError

__all__ = [
    "OPTIMIZERS",
    "SCHEDULE_NAMES",
    "InflightFn",
    "MemoryModel",
    "canonical_schedule",
    "closed_form_inflight",
    "inflight_microbatches",
]

InflightFn = Callable[[str, int, int, int], Sequence[int]]
"""``fn(schedule, ranks, microbatches, virtual)`` -> the peak micro-batches each of the
``ranks * virtual`` stages holds; see [Note: in-flight counts come from the schedule]."""

Optimizer = Literal["none", "sgd", "sgd-momentum", "adam"]
OPTIMIZERS: tuple[str, ...] = ("none", "sgd", "sgd-momentum", "adam")
_STATES = {"none": 0, "sgd": 0, "sgd-momentum": 1, "adam": 2}
SCHEDULE_NAMES: tuple[str, ...] = ("gpipe", "1f1b", "interleaved", "zb-h1")
_SCHEDULE_ALIASES = {
    "one-f-one-b": "1f1b",
    "pipedream-flush": "1f1b",
    "interleaved-1f1b": "interleaved",
    "zbh1": "zb-h1",
    "zero-bubble": "zb-h1",
}
"""The one table of schedule names and aliases: the planner's and `pipeline.schedules`'."""


@dataclass(frozen=True, kw_only=True)
class MemoryModel:
    """What training keeps per parameter byte. See [Note: stage memory]."""

    optimizer: Optimizer = "adam"
    """Optimizer whose state is counted: ``none`` (inference), ``sgd``, ``sgd-momentum``, ``adam``."""
    master_weights: bool = False
    """Keep an fp32 master copy and fp32 optimizer state (mixed-precision training)."""

    def __post_init__(self) -> None:
        if self.optimizer not in _STATES:
            raise PlanError(
                f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}"
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
        kappa += _STATES[self.optimizer] * state_ratio
        if self.master_weights:
            kappa += fp32_ratio
        return kappa


def canonical_schedule(name: str) -> str:
    """The canonical schedule name for ``name`` or its aliases; raises `PlanError` if unknown."""
    key = name.strip().lower().replace("_", "-")
    key = _SCHEDULE_ALIASES.get(key, key)
    if key not in SCHEDULE_NAMES:
        raise PlanError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    return key


def inflight_microbatches(
    schedule: str, stage: int, num_stages: int, microbatches: int, virtual: int = 1
) -> int:
    """Peak micro-batches whose activations ``stage`` keeps alive. See [Note: stage memory].

    For ``interleaved``, ``num_stages`` counts virtual stages (``ranks * virtual``).
    """
    schedule = canonical_schedule(schedule)
    if microbatches < 1:
        raise PlanError(f"micro-batches must be at least 1, got {microbatches}")
    if not 0 <= stage < num_stages:
        raise PlanError(f"stage {stage} out of range for {num_stages} stages")
    if schedule == "gpipe":
        return microbatches
    if schedule == "1f1b":
        return min(num_stages - stage, microbatches)
    if schedule == "zb-h1":  # every stage holds p: its W runs late (see pipeline.schedules)
        return min(num_stages, microbatches)
    if virtual < 1 or num_stages % virtual:
        raise PlanError(f"{num_stages} virtual stages do not divide into {virtual} per rank")
    ranks = num_stages // virtual
    rank = stage % ranks
    warmup = 2 * (ranks - rank - 1) + (virtual - 1) * ranks + 1
    return min(microbatches, warmup)


def closed_form_inflight(
    schedule: str, ranks: int, microbatches: int, virtual: int = 1
) -> tuple[int, ...]:
    """`inflight_microbatches` of every stage: the `InflightFn` used when none is given."""
    stages = ranks * virtual
    return tuple(
        inflight_microbatches(schedule, s, stages, microbatches, virtual) for s in range(stages)
    )
