"""How to plan a model: every knob of `partition.planning.model.plan_model` and ``pipepart plan``, once.

One frozen, keyword-only object with one default per knob, checked when it is made, so a bad
value fails before anything is traced — in Python and on the command line alike (the CLI builds
a `PlanOptions` from its flags and never patches them afterwards).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, get_args

from partition.algorithms.problem import DEFAULT_OBJECTIVE, OBJECTIVES
from partition.errors import PlanError
from partition.graph import ORDERS
from partition.memory import MemoryModel
from partition.microbatch import DEFAULT_MICROBATCHES
from partition.schedules.custom import custom_virtual
from partition.schedules.names import (
    DEFAULT_SCHEDULE,
    canonical_schedule,
    is_custom,
    stages_per_rank,
)
from partition.trace.fx import TraceMethod

__all__ = ["CUTS", "MODES", "Cuts", "Modes", "PlanOptions", "with_knobs"]

Cuts = Literal["partitioner", "markers"]
"""Who places the cuts: the partitioner, or the model's ``pipe_split()`` markers."""
CUTS: tuple[str, ...] = get_args(Cuts)
Modes = Literal["both", "train", "eval"]
"""Which of the model's modes to trace and plan; see `PlanOptions.modes`."""
MODES: tuple[str, ...] = get_args(Modes)
_METHODS: tuple[str, ...] = get_args(TraceMethod)


@dataclass(frozen=True, kw_only=True)
class PlanOptions:
    """How to trace, cost and split a model. See `partition.planning.model.plan_model`."""

    schedule: str = DEFAULT_SCHEDULE
    """``gpipe``, ``1f1b``, ``interleaved`` (with ``virtual`` stages per device), ``zb-h1``,
    ``zb-v`` or ``dualpipev`` (V-shaped, 2 stages per device; aliases accepted, stored
    canonical), or ``@FILE``, a schedule you write (stored as its
    text; see [Note: a schedule a user writes]); decides how many micro-batches each stage holds."""
    microbatches: int = DEFAULT_MICROBATCHES
    """Micro-batches per step; the example inputs are one full batch of them."""
    virtual: int = 1
    """Stages per device (``interleaved`` only, and then at least 2; 2 for ``zb-v`` and
    ``dualpipev``, which set it from the default 1; a written schedule's is its stage count
    over its lines)."""
    memory: MemoryModel = field(default_factory=MemoryModel)
    """What training keeps per parameter (optimizer state, master weights)."""
    algorithm: str = "optimal"
    """``optimal`` (the exact partitioner) or a baseline: ``uniform``, ``params``, ``time``."""
    objective: str = DEFAULT_OBJECTIVE
    """What ``optimal`` minimises: ``bottleneck`` (the slowest stage, then the tie-breaks of
    [Note: objective]) or ``step``, the schedule's predicted step ``lambda B + S`` (see
    [Note: step objective] in `partition.algorithms.step`)."""
    cuts: Cuts = "partitioner"
    """``partitioner`` (``algorithm`` places the cuts), or ``markers``: one stage per segment
    between the model's ``pipe_split()`` calls (see `partition.trace.markers`)."""
    bounds: tuple[int, ...] | None = None
    """The split itself, as node indices of the linear order (``0 = b_0 < ... < b_k = n``):
    no algorithm places the cuts; the plan is priced as given."""
    method: TraceMethod = "auto"
    """``fx``, ``export``, or ``auto`` (fx, falling back to export)."""
    leaf_modules: tuple[Any, ...] = ()
    """Module classes or qualified names fx keeps whole (it does not trace inside them)."""
    concrete_args: Mapping[str, Any] | None = None
    """fx's ``concrete_args``: arguments fixed at trace time."""
    tracer_class: Any = None
    """A `torch.fx.Tracer` subclass of your own for the fx route (default: pipepart's)."""
    order: str = "auto"
    """The node order cuts are placed in: ``auto``, ``graph`` or ``late`` (see
    [Note: node order] in `partition.graph`); with ``cuts="markers"``, ``auto`` means ``graph``."""
    profile: bool = False
    """Measure node times on this machine (CUDA if available, else CPU), taking the first device
    as the kind this machine is, instead of pricing FLOPs."""
    modes: Modes = "both"
    """``both``: when the forward reads ``self.training``, trace train and eval mode and place
    cuts valid in both (see `partition.modes.cuts`), so that the pipeline can switch modes;
    ``train`` or ``eval`` (the mode the model is in): trace that mode only, and the pipeline
    refuses the other (for a model whose other mode cannot be traced, or is never used)."""

    def __post_init__(self) -> None:
        from partition.solve import ALGORITHMS

        object.__setattr__(self, "schedule", canonical_schedule(self.schedule))
        object.__setattr__(self, "leaf_modules", tuple(self.leaf_modules))
        if self.bounds is not None:
            object.__setattr__(self, "bounds", tuple(int(b) for b in self.bounds))
            if self.cuts == "markers":
                raise PlanError("give bounds or cuts='markers', not both: both place the cuts")
        for name in ("microbatches", "virtual"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PlanError(f"{name} must be a positive integer, got {value!r}")
        if is_custom(self.schedule):  # stages per device: the file's
            virtual = custom_virtual(self.schedule)
            if self.virtual not in (1, virtual):
                raise PlanError(
                    f"the schedule file has {virtual} stage(s) per rank, --virtual asks for "
                    f"{self.virtual}; leave --virtual out (the file decides it)"
                )
            object.__setattr__(self, "virtual", virtual)
        else:  # the V schedules' 2 from the default 1; see [Note: placement]
            object.__setattr__(self, "virtual", stages_per_rank(self.schedule, self.virtual))
        if not isinstance(self.memory, MemoryModel):
            raise PlanError(f"memory must be a MemoryModel, got {type(self.memory).__name__}")
        for name, value, allowed in (
            ("algorithm", self.algorithm, ALGORITHMS),
            ("objective", self.objective, OBJECTIVES),
            ("cuts", self.cuts, CUTS),
            ("method", self.method, _METHODS),
            ("order", self.order, ORDERS),
            ("modes", self.modes, MODES),
        ):
            if value not in allowed:
                raise PlanError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")

    @property
    def node_order(self) -> str:
        """The order to linearise in: ``graph`` for marker cuts left on ``auto``."""
        return "graph" if self.cuts == "markers" and self.order == "auto" else self.order


def with_knobs(options: PlanOptions | None, knobs: Mapping[str, Any]) -> PlanOptions:
    """``options`` (default `PlanOptions()`) with ``knobs``, its fields one by one, over it; an
    unknown knob is a `TypeError` naming the fields there are."""
    names = [f.name for f in fields(PlanOptions)]
    unknown = sorted(set(knobs) - set(names))
    if unknown:
        raise TypeError(
            f"unknown planning option(s) {', '.join(unknown)}; PlanOptions has {', '.join(names)}"
        )
    return replace(options or PlanOptions(), **knobs) if knobs else options or PlanOptions()
