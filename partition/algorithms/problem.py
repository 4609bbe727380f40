"""The partitioning problem: what to split, over which devices, under which schedule, and its costs.

A `Problem` is checked on construction and derives what every algorithm reads from it: the
number of stages, each stage's device and memory cap, the micro-batches each stage keeps in
flight, and `Costs`, its prefix sums and per-stage arrays — the one implementation of a stage's
time ``T`` and memory ``M`` and of the exact units of the total time, as [Note: objective] in
`partition.algorithms.objective` defines them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import numpy.typing as npt

from partition.devices import Device
from partition.errors import PlanError
from partition.graph import LinearGraph
from partition.memory import MemoryModel
from partition.schedules.inflight import schedule_inflight
from partition.schedules.names import (
    V_SCHEDULES,
    canonical_schedule,
    is_custom,
    placement_of,
    stages_per_rank,
)
from partition.schedules.placement import check_placement, stage_rank

__all__ = ["DEFAULT_MEMORY", "DEFAULT_OBJECTIVE", "IDLE_SHARE", "OBJECTIVES", "Costs", "Problem"]

DEFAULT_MEMORY = MemoryModel()
"""What training keeps per parameter byte unless told otherwise: Adam, no master copy."""
OBJECTIVES: tuple[str, ...] = ("step", "bottleneck")
"""What the exact partitioner minimises: the predicted step (`partition.algorithms.step`) or the
bottleneck alone ([Note: objective] in `partition.algorithms.objective`)."""
DEFAULT_OBJECTIVE = "bottleneck"
IDLE_SHARE = 0.01
"""A stage whose compute is at most this fraction of an even share (``P_n / k``) is *idle*: it
leaves its device all but unused; see [Note: objective] in `partition.algorithms.objective`."""
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
Index = IntArray | np.int64 | int
"""Cut positions: one or an array of them."""


@dataclass(frozen=True, kw_only=True)
class Problem:
    """What to split, over which devices, under which schedule.

    See [Note: objective] in `partition.algorithms.objective`.
    """

    graph: LinearGraph
    """The nodes in order with their costs."""
    devices: tuple[Device, ...]
    """One per pipeline rank, in pipeline order; stage ``s`` runs on ``stage_device(s)``:
    ``devices[s % len(devices)]``, or V-shaped (see [Note: placement] in
    `partition.schedules.placement`)."""
    schedule: str
    """A name in `partition.schedules.names.SCHEDULE_NAMES` (aliases accepted, stored
    canonical), or a schedule's text."""
    microbatches: int
    """Micro-batches per step; sets how many each stage keeps in flight."""
    virtual: int = 1
    """Stages per device (``interleaved``: at least 2; ``zb-v``, ``dualpipev``: 2)."""
    memory: MemoryModel = DEFAULT_MEMORY
    """What training keeps per parameter byte."""
    objective: str = DEFAULT_OBJECTIVE
    """What the exact partitioner minimises, one of `OBJECTIVES` (the baselines ignore it)."""

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
        if not is_custom(self.schedule) and self.virtual > 1:
            stages_per_rank(self.schedule, self.virtual)  # raises for what cannot place it
        elif self.schedule in V_SCHEDULES:
            raise PlanError(
                f"schedule {self.schedule!r} is V-shaped, 2 stages per device; use virtual=2"
            )
        check_placement(self.placement, len(devices), len(devices) * self.virtual)
        if not isinstance(self.memory, MemoryModel):
            raise PlanError(f"memory must be a MemoryModel, got {type(self.memory).__name__}")
        if self.objective not in OBJECTIVES:
            raise PlanError(
                f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}"
            )

    @property
    def num_stages(self) -> int:
        """Stages in the pipeline: ``len(devices) * virtual``."""
        return len(self.devices) * self.virtual

    @property
    def placement(self) -> str:
        """Which device holds which stage: ``loop`` or ``v``; see [Note: placement]."""
        return placement_of(self.schedule)

    def stage_rank(self, stage: int) -> int:
        """The index in `devices` of the device stage ``stage`` runs on."""
        return stage_rank(stage, len(self.devices), self.placement)

    def stage_device(self, stage: int) -> Device:
        """The device stage ``stage`` runs on."""
        return self.devices[self.stage_rank(stage)]

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


class Costs:
    """Prefix sums and per-stage arrays of a `Problem`: the one implementation of ``T`` and ``M``."""

    def __init__(self, problem: Problem) -> None:
        g = problem.graph
        self.n = len(g)
        self.k = problem.num_stages
        self.kappa = problem.kappa
        zero = np.zeros(1)
        recompute = problem.memory.recompute  # the backward runs the forward again
        compute = g.compute + g.forward if recompute else g.compute
        self.P: FloatArray = np.concatenate([zero, np.cumsum(compute, dtype=np.float64)])
        self.W: FloatArray = np.concatenate([zero, np.cumsum(g.param_bytes, dtype=np.float64)])
        self.V: FloatArray = np.concatenate([zero, np.cumsum(g.buffer_bytes, dtype=np.float64)])
        self.H: FloatArray = self.kappa * self.W + self.V
        """Prefix sums of what the weights hold: ``kappa`` per parameter byte, buffers once."""
        self.A: FloatArray = np.concatenate([zero, np.cumsum(g.saved_bytes, dtype=np.float64)])
        self.c: FloatArray = np.asarray(g.cut_bytes, dtype=np.float64)
        self.N: FloatArray = np.concatenate([zero, np.cumsum(g.dispatched, dtype=np.float64)])
        """Prefix sums of the operations each node dispatches (`LinearGraph.dispatched`)."""
        self.idle_from: IntArray = self.P.searchsorted(
            self.P - IDLE_SHARE * float(self.P[-1]) / self.k, "left"
        )
        """Per cut ``j``, the first start ``i`` that makes ``[i, j)`` idle: ``P_i >= P_j - tau``."""
        devices = [problem.stage_device(s) for s in range(self.k)]
        self.flops: FloatArray = np.array([d.flops for d in devices], dtype=np.float64)
        self.latency: FloatArray = np.array(
            [d.latency + d.message_overhead for d in devices], dtype=np.float64
        )
        """Per stage, the fixed seconds of a message to the next stage: the link's latency and
        the ranks' own cost of a message (`Device.message_overhead`)."""
        self.bandwidth: FloatArray = np.array([d.bandwidth for d in devices], dtype=np.float64)
        self.dispatch: FloatArray = np.array(
            [(2 if recompute else 1) * d.dispatch_forward + d.dispatch_backward for d in devices],
            dtype=np.float64,
        )
        """Per stage, the fixed seconds of one operation's forward and backward."""
        self.overhead: FloatArray = np.array([d.action_overhead for d in devices], dtype=np.float64)
        """Per stage, the fixed seconds of a forward and a backward action beyond their nodes."""
        self.fixed = bool(self.dispatch.any() or self.overhead.any())
        """Whether any stage has fixed costs (else every time is compute and links alone)."""
        ranks = [problem.stage_rank(s) for s in range(self.k)]
        loop = problem.placement == "loop"
        self.remote: npt.NDArray[np.bool_] = np.array(
            [loop or a != b for a, b in itertools.pairwise(ranks)], dtype=bool
        )
        """Per cut ``s`` (stage ``s`` to ``s + 1``), whether it is priced as a link: the V
        placement's middle cut stays on one device and costs none (see [Note: placement]); the
        loop placement prices every cut, as [Note: objective] writes it."""
        self.cap: FloatArray = np.array(problem.caps, dtype=np.float64)
        self.inflight: FloatArray = np.array(problem.inflight, dtype=np.float64)
        self.act: FloatArray = np.ones(self.k) if recompute else self.inflight
        """Per stage, the micro-batches of saved activations held at peak: `inflight`, or 1
        under recompute (see [Note: recompute] in `partition.memory`)."""
        self.hold: FloatArray = 1.0 + self.inflight if recompute else np.ones(self.k)
        """Per stage, how many copies of its input cut it holds: the receive buffer, and under
        recompute each in-flight micro-batch's saved input."""
        self._q: dict[float, FloatArray] = {}
        self._links: dict[tuple[float, float], FloatArray] = {}
        self._units: dict[tuple[str, float, float], FloatArray] = {}
        self.unit = self._unit()
        """Seconds per unit of the exact total time; see [Note: objective] in
        `partition.algorithms.objective`."""

    def _no_link(self, stage: int) -> bool:
        return stage < 0 or stage >= self.k - 1 or not self.remote[stage]

    def link(self, stage: int, cut_bytes: FloatArray) -> FloatArray:
        """Seconds to send ``cut_bytes`` from ``stage`` to the next stage and the gradient back."""
        if self._no_link(stage):
            return np.zeros_like(cut_bytes)
        t = 2.0 * (self.latency[stage] + cut_bytes / self.bandwidth[stage])
        return np.where(cut_bytes != 0, t, 0.0)

    def link_at(self, stage: int) -> FloatArray:
        """`link` of ``stage`` at every cut, length ``n + 1`` (cached per link)."""
        if self._no_link(stage):
            key = (0.0, 0.0)
        else:
            key = (float(self.latency[stage]), float(self.bandwidth[stage]))
        out = self._links.get(key)
        if out is None:
            out = self.link(stage, self.c) if key != (0.0, 0.0) else np.zeros_like(self.c)
            self._links[key] = out
        return out

    def _unit(self) -> float:
        links = [float(self.link_at(s).max()) for s in range(self.k - 1)] if self.n else []
        # The largest stage time: all nodes on one stage (P_n / f_s is largest for the least f_s).
        slowest = self.P[-1] / self.flops + self.N[-1] * self.dispatch + self.overhead
        top = float(slowest.max()) + max(links, default=0.0)
        if not top > 0.0 or not math.isfinite(top):
            return 1.0
        e = math.frexp(top)[1]  # top < 2^e
        m = (self.k + 3).bit_length()  # 2^m > k + 3
        return math.ldexp(1.0, e + m - 52)

    def prefix_time(self, stage: int) -> FloatArray:
        """``X_s = P / flops_s + N * dispatch_s``: a stage's time of nodes ``[i, j)`` less its
        action overhead and links is ``X_s[j] - X_s[i]`` (up to rounding)."""
        return self.P / self.flops[stage] + self.N * self.dispatch[stage]

    def time_units(self, stage: int) -> FloatArray:
        """``R_s``: `prefix_time` in units, rounded, at every cut (cached per speed and dispatch
        cost). The action overheads are left out: every split pays each stage's once."""
        key = ("P", float(self.flops[stage]), float(self.dispatch[stage]))
        out = self._units.get(key)
        if out is None:
            out = np.rint(self.prefix_time(stage) / self.unit)
            self._units[key] = out
        return out

    def link_units(self, stage: int) -> FloatArray:
        """``L_s``: `link_at` in units, rounded (zero for no link; cached per link)."""
        if self._no_link(stage):
            key = ("L", 0.0, 0.0)
        else:
            key = ("L", float(self.latency[stage]), float(self.bandwidth[stage]))
        out = self._units.get(key)
        if out is None:
            out = np.rint(self.link_at(stage) / self.unit)
            self._units[key] = out
        return out

    def split_units(self, bounds: Sequence[int]) -> float:
        """The total time of a split in units: the exact S of [Note: objective] (an integer)."""
        total = 0.0
        for s in range(self.k):
            i, j = int(bounds[s]), int(bounds[s + 1])
            r = self.time_units(s)
            total += (r[j] - r[i]) + (self.link_units(s - 1)[i] + self.link_units(s)[j])
        return total

    def split_idle(self, bounds: Sequence[int]) -> int:
        """How many stages of a split are idle (see `IDLE_SHARE`)."""
        b = np.asarray(bounds, dtype=np.int64)
        return int((b[:-1] >= self.idle_from[b[1:]]).sum())

    def q(self, inflight: float) -> FloatArray:
        """Prefix sums of ``kappa * param_bytes + buffer_bytes + inflight * saved_bytes``."""
        q = self._q.get(inflight)
        if q is None:
            q = self.H + inflight * self.A
            self._q[inflight] = q
        return q

    def compute_time(self, stage: int, i: Index, j: Index) -> FloatArray:
        """Compute and fixed costs of nodes ``[i, j)`` on ``stage`` (all but the links)."""
        compute = (self.P[j] - self.P[i]) / self.flops[stage]
        return compute + (self.N[j] - self.N[i]) * self.dispatch[stage] + self.overhead[stage]

    def comm_time(self, stage: int, i: Index, j: Index) -> FloatArray:
        return self.link(stage - 1, self.c[i]) + self.link(stage, self.c[j])

    def time(self, stage: int, i: Index, j: Index) -> FloatArray:
        """``T_s(i, j)`` for arrays of bounds (broadcast)."""
        return self.compute_time(stage, i, j) + self.comm_time(stage, i, j)

    def memory_parts(
        self, stage: int, i: Index, j: Index
    ) -> tuple[FloatArray, FloatArray, FloatArray]:
        """``M_s(i, j)`` as (weights and their state, activations, receive buffers)."""
        params = self.H[j] - self.H[i]
        acts = self.act[stage] * (self.A[j] - self.A[i]) + (self.hold[stage] - 1.0) * self.c[i]
        return params, acts, self.c[i] + self.c[j]

    def memory(self, stage: int, i: Index, j: Index) -> FloatArray:
        """``M_s(i, j)`` for arrays of bounds (broadcast)."""
        params, acts, buffers = self.memory_parts(stage, i, j)
        return (params + acts) + buffers

    def split_times(self, bounds: Sequence[int]) -> FloatArray:
        """``T_s`` of every stage of a split (the arithmetic of `time`, all stages at once)."""
        b = np.asarray(bounds, dtype=np.int64)
        i, j = b[:-1], b[1:]
        compute = (self.P[j] - self.P[i]) / self.flops
        compute = compute + (self.N[j] - self.N[i]) * self.dispatch + self.overhead
        lat, bw = self.latency[:-1], self.bandwidth[:-1]  # the links between stages
        cin, cout = self.c[i[1:]], self.c[j[:-1]]
        t_in = np.where((cin != 0) & self.remote, 2.0 * (lat + cin / bw), 0.0)
        t_out = np.where((cout != 0) & self.remote, 2.0 * (lat + cout / bw), 0.0)
        zero = np.zeros(1)
        return compute + (np.concatenate([zero, t_in]) + np.concatenate([t_out, zero]))
