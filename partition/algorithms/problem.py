"""The partitioning problem: what to split, over which devices, under which schedule.

A `Problem` is checked on construction and derives what every algorithm reads from it: the
number of stages, each stage's device and memory cap, the micro-batches each stage keeps in
flight, and the prefix sums of the objective (`Problem.costs`, see [Note: objective] in
`partition.algorithms.objective`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from partition.algorithms.objective import Costs
from partition.devices import Device
from partition.errors import PlanError
from partition.graph import LinearGraph
from partition.memory import MemoryModel
from partition.schedules.inflight import schedule_inflight
from partition.schedules.names import canonical_schedule

__all__ = ["DEFAULT_MEMORY", "Problem"]

DEFAULT_MEMORY = MemoryModel()
"""What training keeps per parameter byte unless told otherwise: Adam, no master copy."""


@dataclass(frozen=True, kw_only=True)
class Problem:
    """What to split, over which devices, under which schedule.

    See [Note: objective] in `partition.algorithms.objective`.
    """

    graph: LinearGraph
    """The nodes in order with their costs."""
    devices: tuple[Device, ...]
    """One per pipeline rank, in pipeline order; stage ``s`` runs on ``devices[s % len(devices)]``."""
    schedule: str
    """``gpipe``, ``1f1b``, ``interleaved`` or ``zb-h1`` (aliases accepted, stored canonical)."""
    microbatches: int
    """Micro-batches per step; sets how many each stage keeps in flight."""
    virtual: int = 1
    """Virtual stages per device (``interleaved`` only)."""
    memory: MemoryModel = DEFAULT_MEMORY
    """What training keeps per parameter byte."""

    def __post_init__(self) -> None:
        if not isinstance(self.graph, LinearGraph):
            raise PlanError(f"graph must be a LinearGraph, got {type(self.graph).__name__}")
        devices = tuple(self.devices)
        if not devices:
            raise PlanError("no devices given: a pipeline needs at least one device")
        for d in devices:
            if not isinstance(d, Device):
                raise PlanError(f"devices must be Device objects, got {type(d).__name__}")
        object.__setattr__(self, "devices", devices)
        object.__setattr__(self, "schedule", canonical_schedule(self.schedule))
        if isinstance(self.microbatches, bool) or not isinstance(self.microbatches, int):
            raise PlanError(f"micro-batches must be an integer, got {self.microbatches!r}")
        if self.microbatches < 1:
            raise PlanError(f"micro-batches must be at least 1, got {self.microbatches}")
        if isinstance(self.virtual, bool) or not isinstance(self.virtual, int) or self.virtual < 1:
            raise PlanError(
                f"virtual stages per device must be a positive integer, got {self.virtual!r}"
            )
        if self.virtual > 1 and self.schedule != "interleaved":
            raise PlanError(
                f"virtual={self.virtual} needs the interleaved schedule, not {self.schedule!r}; "
                "use schedule='interleaved' or virtual=1"
            )
        if not isinstance(self.memory, MemoryModel):
            raise PlanError(f"memory must be a MemoryModel, got {type(self.memory).__name__}")

    @property
    def num_stages(self) -> int:
        """Stages in the pipeline: ``len(devices) * virtual``."""
        return len(self.devices) * self.virtual

    def stage_device(self, stage: int) -> Device:
        """The device stage ``stage`` runs on."""
        return self.devices[stage % len(self.devices)]

    @cached_property
    def caps(self) -> tuple[float, ...]:
        """Bytes each stage may use: its device's memory over ``virtual``."""
        return tuple(self.stage_device(s).memory / self.virtual for s in range(self.num_stages))

    @cached_property
    def inflight(self) -> tuple[int, ...]:
        """Micro-batches whose activations each stage keeps at its peak."""
        return self.inflight_for(len(self.devices))

    def inflight_for(self, ranks: int) -> tuple[int, ...]:
        """The in-flight counts of each stage on ``ranks`` devices (the others as here)."""
        counts = tuple(
            int(c) for c in schedule_inflight(self.schedule, ranks, self.microbatches, self.virtual)
        )
        if len(counts) != ranks * self.virtual or min(counts) < 1:
            raise PlanError(
                f"the in-flight counts {list(counts)} are not one positive count per stage of "
                f"{ranks * self.virtual}"
            )
        return counts

    @cached_property
    def kappa(self) -> float:
        """Bytes held per parameter byte (weights, gradients, optimizer state, master copy)."""
        return self.memory.bytes_per_param_byte(self.graph.param_element_size)

    @cached_property
    def costs(self) -> Costs:
        """Prefix sums and per-stage constants shared by every algorithm."""
        return Costs(self)
