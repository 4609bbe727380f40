"""The step-time objective: the least predicted step ``lambda B + S``, by a parametric search over
the bottleneck ``B``.

[Note: step objective]
A schedule's step, with stage times ``T_s`` (bottleneck ``B = max_s T_s``, total ``S = sum_s
T_s``), is priced as ``alpha B + beta S``: the steady state repeats the slowest stage, the fill
and drain pass through every stage once. The weights come from the schedule itself, not from a
table: the simulator (`partition.schedules.simulate`) plays the schedule once with every stage
equal (forward ``rho``, backward ``1 - rho`` of a unit stage, ``rho`` the graph's forward share),
giving a step of ``s0`` units, and the slowest stage runs its ``m`` micro-batches back to back,
so the step grows by at most ``m`` per unit of ``B``::

    alpha + beta = m      alpha + beta k = s0      (k stages)

so the form agrees with the simulator on every balanced pipeline and in how much the slowest
stage costs. GPipe and 1F1B give ``s0 = m + k - 1``: ``alpha = m - 1``, ``beta = 1``, the
classic ``(m - 1) B + S`` (exact for GPipe in the simulator when forward and backward times are
proportional, with no links). ZB-H1 fills its bubbles with W (``beta < 1``: the fill costs
less), interleaved has ``k = v p`` short stages (``beta > 1``), and a schedule added to
`partition.schedules.names` is priced the same way with no code here. Heterogeneous stages
and links are where the form and the simulator part (the simulator overlaps sends with compute,
``T_s`` adds both directions of both links; an early slow stage under 1F1B hides some of its
forwards in the warm-up): a model, exact for its own terms, and the plan still reports the
simulator's step.

The objective minimises ``J = lambda B + S`` with ``lambda = alpha / beta`` over the splits
that fit memory and leave no more stages idle than their bottleneck forces — a split with an
idle stage is a candidate only if no split of a bottleneck as small has fewer (the rule of
[Note: objective] in `partition.algorithms.objective` that keeps devices in use; see issue 18):
the least ``J`` over the splits ``x`` with ``idle(x) = I(B(x))``, ``I(b)`` the fewest idle
stages of a split of bottleneck at most ``b``. Then, among the splits of that bottleneck, the
same tie-breaks as the bottleneck objective (idle stages, ``S``, communication, peak memory).

*Search.* Let ``l(B)`` be the least label (idle stages, total time in exact units) over the splits
of bottleneck at most ``B`` (`partition.algorithms.ties.labels`): non-increasing in ``B``, a step
function whose *plateaus* ``[L, R]`` each hold one label, reached first at ``L`` by a split of
bottleneck ``L``. So the least ``J`` is ``min over plateaus of lambda L + S``, and the search
looks for the left ends of the plateaus that could win, from the optimum ``B*`` of the
bottleneck search up to ``B_hi = (J(x*) - S_lo) / lambda`` (``x*`` the bottleneck objective's
split, ``S_lo`` a lower bound of every split's total: the fastest device's time for all the
compute plus the narrowest cuts' links), past which no split can win. Between two probes ``a <
c`` with labels ``l(a) != l(c)`` a split of bottleneck in ``(a, c]`` has ``J >= lambda a + S``,
``S`` at least ``l(c)``'s total when both have the same idle count (else ``S_lo``); when that
reaches the best ``J`` found the interval is dropped. Otherwise the left end of ``l(c)``'s
plateau is bisected: a probe of the same label snaps the right end down to its split's
bottleneck, a probe of another label becomes the left end and leaves the interval below it
for later. A plateau's end is found when the two ends are within ``2 RTOL`` (the probes' own
slack). Every probe's split is a candidate and its ``J`` an upper bound, so the best ``J`` falls
as the search goes; the split returned is the tie-break at the best one's bottleneck.

On identical devices with cuts of equal width every split of a bottleneck has the same ``S``
and ``B_hi = B*``: no probe beyond the bottleneck search's. When the walk keeps finding better
splits step after step (a long descent through dense plateaus), a few cheaper probes (labels
without their left ends) look further down by golden section, so that the best is found early
and the strides grow. Brute force over every
contiguous split agrees on ``J``, for every schedule, with memory caps, fixed costs and
recompute (`tests/partition/test_step.py`).

*Not the default.* `benchmarks/step_objective.py` (152 configurations: GPT-like graphs of 1k and
10k nodes, 8 and 16 H100-like devices or H100s alternating with 2.5x slower ones, every
schedule, 4-32 micro-batches) gives a different split in 59; the simulator predicts 50 of them
faster (median 0.7 %, up to 18.7 %: mixed devices, few micro-batches) and 7 slower (up to
3.3 %), all 7 under V or interleaved schedules, where a device runs several stages and
``lambda B + S`` prices them apart (GPipe, 1F1B, ZB-H1: 20 faster, none slower). Solving costs
a median 2.7x the bottleneck objective's, up to 145x (3 s) where many plateaus compete (mixed
devices, 4 micro-batches: tens of label passes); on the `partition_speed` rows 1.0-1.9x, but
7.6x and 3.9x on 10k and 100k nodes over 64 stages. Neither "never slower" nor
"within 2x" holds, so ``bottleneck`` stays the default and ``step`` is asked for
(``--objective step``, and the default of ``plan --auto``, whose configurations it prices).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from partition.algorithms.objective import Bounds
from partition.algorithms.problem import Problem
from partition.algorithms.reach import RTOL, Search
from partition.algorithms.ties import labels, tie_break
from partition.errors import PlanError

__all__ = ["least_step", "step_lambda", "step_weights"]

_INF = math.inf
_MAX_PROBES = 400
_SEEDS = 6
"""Label probes of the golden-section seed (`_Search._seed`), at most."""
_SEED_AFTER = 3
"""Steps down that each found a better split before the walk seeds (a long descent)."""
"""Label probes the search may spend; past them it returns the best split found (never seen)."""


@functools.lru_cache(maxsize=512)
def _weights(
    schedule: str, ranks: int, microbatches: int, virtual: int, rho: float
) -> tuple[float, float]:
    from partition.schedules.custom import schedule_for
    from partition.schedules.simulate import simulate

    m = microbatches
    try:
        built = schedule_for(schedule, ranks, m, virtual)
    except PlanError:  # a count the schedule cannot run: the classic form
        return float(m - 1), 1.0
    k = built.num_stages
    if k < 2:
        return float(m - 1), 1.0
    s0 = simulate(built, forward_time=rho, backward_time=1.0 - rho).step_time
    beta = (float(s0) - m) / (k - 1)
    if beta <= 0.0:  # no fill or drain to price: the bottleneck alone
        return float(m), 0.0
    return max(float(m) - beta, 0.0), beta


def step_weights(problem: Problem) -> tuple[float, float]:
    """``(alpha, beta)``: ``problem``'s schedule steps in about ``alpha B + beta S`` seconds; see
    [Note: step objective]."""
    g = problem.graph
    total = float(g.compute.sum())
    rho = float(g.forward.sum()) / total if total > 0 else 1.0 / 3.0
    rho = min(max(round(rho, 6), 0.0), 1.0)
    ranks = len(problem.devices)
    return _weights(problem.schedule, ranks, problem.microbatches, problem.virtual, rho)


def step_lambda(problem: Problem) -> float:
    """``lambda = alpha / beta``, the weight of the bottleneck against the total time (inf: the
    schedule has no fill to price)."""
    alpha, beta = step_weights(problem)
    return _INF if beta == 0.0 else alpha / beta


@dataclass(frozen=True)
class _Plateau:
    """One probe of the search: the least (idle stages, units) within ``B``, the least
    bottleneck ``left`` of a split with that label (the plateau's left end), and that split."""

    B: float
    idle: int
    units: float
    left: float
    split: Bounds

    @property
    def label(self) -> tuple[int, float]:
        return self.idle, self.units


def least_step(search: Search, B: float, split: Bounds) -> Bounds:
    """The split of least ``lambda B + S`` (then the tie-breaks) given the least bottleneck ``B``
    and the bottleneck objective's split there; see [Note: step objective]."""
    lam = step_lambda(search.problem)
    if search.k == 1 or math.isinf(lam):
        return split
    return _Search(search, lam).run(B, split)


class _Search:
    def __init__(self, search: Search, lam: float) -> None:
        self.search, self.lam = search, lam
        self.costs = search.costs
        self.u = self.costs.unit
        self.probes = 0
        self.best_j = _INF
        self.best: _Plateau | None = None

    def j(self, p: _Plateau) -> float:
        return self.lam * p.left + p.units * self.u

    def note(self, p: _Plateau) -> None:
        value = self.j(p)
        if value < self.best_j:
            self.best_j, self.best = value, p

    def probe(self, B: float) -> _Plateau | None:
        """The plateau holding ``B``: its label, and its left end, the least bottleneck over the
        splits of that label within ``B`` (`labels` with ``measure="time"``, the path's largest
        stage time minimised over the tight stages); bisected where the ties are too many."""
        self.probes += 1
        search = self.search
        probe = search.probe(B)
        if not probe.feasible:  # pragma: no cover - B is at least the least bottleneck
            return None
        found = labels(search, probe, B, peak=True, measure="time", by_comm=False)
        if found is None:  # too many tied starts: the left end by bisection instead
            found = labels(search, probe, B, peak=False, tight=False, by_comm=False)
            if found is None:  # pragma: no cover - the probe reached cut n
                return None
            plateau = self._plateau(B, found.split, found.units)
            plateau = self._bisect_left(plateau)
        else:
            plateau = self._plateau(B, found.split, found.units)
        self.note(plateau)
        return plateau

    def _plateau(self, B: float, split: Bounds, units: float | None = None) -> _Plateau:
        c = self.costs
        units = c.split_units(split) if units is None else units
        return _Plateau(B, c.split_idle(split), units, self.search.bottleneck(split), split)

    def _bisect_left(self, p: _Plateau) -> _Plateau:
        """``p`` with its left end found by bisection (each step a probe of the label alone)."""
        lo, hi = 0.0, p
        while hi.left > lo * (1 + 2 * RTOL) and self.probes < _MAX_PROBES:
            mid = max(0.5 * (lo + hi.left), hi.left * 0.5)
            self.probes += 1
            probe = self.search.probe(mid)
            found = (
                labels(self.search, probe, mid, peak=False, tight=False, by_comm=False)
                if probe.feasible
                else None
            )
            q = None if found is None else self._plateau(mid, found.split, found.units)
            if q is not None and q.label == p.label:
                hi = q
            else:
                lo = mid
        return _Plateau(p.B, p.idle, p.units, hi.left, hi.split)

    def _seed(self, lo: float, hi: float) -> None:
        """A few label probes between ``lo`` and ``hi`` by golden section on the ``J`` of their
        splits: a good best early makes the walk down from the top take long strides (see
        **Search**); each split is a candidate, so its ``J`` is a true upper bound."""
        ratio = (math.sqrt(5.0) - 1.0) / 2.0
        a, b = lo, hi
        cache: dict[float, float] = {}

        def value(x: float) -> float:
            if x not in cache:
                self.probes += 1
                probe = self.search.probe(x)
                found = labels(self.search, probe, x, peak=False, tight=False, by_comm=False)
                if found is None:  # pragma: no cover - x is at least the least bottleneck
                    cache[x] = _INF
                else:
                    p = self._plateau(x, found.split, found.units)  # left: its bottleneck
                    self.note(p)
                    cache[x] = self.j(p)
            return cache[x]

        for _ in range(_SEEDS // 2):
            c, d = b - ratio * (b - a), a + ratio * (b - a)
            if value(c) <= value(d):
                b = d
            else:
                a = c

    def run(self, B: float, split: Bounds) -> Bounds:
        first = self._plateau(B, split)
        self.note(first)
        lowest = least_units(self.search)
        hi = self.search.max_time()
        if self.lam > 0:
            hi = min(hi, (self.best_j - lowest * self.u) / self.lam)
        if hi <= B * (1 + 4 * RTOL):
            return split
        top = self.probe(hi)
        if top is None:  # pragma: no cover
            return split
        # Down from the top: below y's plateau, a split beats the best only if its bottleneck
        # is at least t, so the next probe is at t (or just below y's left end).
        y, better, seeded = top, 0, False
        while self.probes < _MAX_PROBES and y.label != first.label:
            if better >= _SEED_AFTER and not seeded:  # a long descent: look further ahead
                self._seed(B, y.left)
                seeded = True
            floor = y.units if y.idle == first.idle else lowest
            gap = self.best_j - floor * self.u
            if gap <= 0.0:
                break  # nothing below y's plateau can beat the best
            t = y.left * (1 - 4 * RTOL)
            if self.lam > 0:
                t = min(t, gap / self.lam)
            if t <= B * (1 + 2 * RTOL):
                break  # every split in between has J at least the best
            before = self.best_j
            below = self.probe(t)
            if below is None:  # pragma: no cover
                break
            better = better + 1 if self.best_j < before else 0
            y = below
        best = self.best
        if best is None or best.split == split:
            return split
        return tie_break(self.search, best.left, best.split)


def least_units(search: Search) -> float:
    """A lower bound of every split's total time in units (`Costs.split_units`): the compute
    (exactly, when every stage has the same speed and dispatch cost: the rounded prefixes
    telescope; else all of it on the fastest device at the least dispatch cost, each stage's
    rounding within a unit), plus both directions of the ``k - 1`` narrowest links over
    distinct cuts."""
    c, k, n = search.costs, search.k, search.n
    if len({(float(f), float(d)) for f, d in zip(c.flops, c.dispatch, strict=True)}) == 1:
        r = c.time_units(0)
        work = float(r[-1] - r[0])
    else:
        fastest = float(c.P[-1]) / float(c.flops.max()) + float(c.N[-1]) * float(c.dispatch.min())
        work = fastest / c.unit - k
    if k < 2 or n < 2:
        return work
    links = c.link_units(0)[1:n]
    for s in range(1, k - 1):  # one array per distinct link (cached), so few on most machines
        links = np.minimum(links, c.link_units(s)[1:n])
    narrow = np.partition(links, k - 2)[: k - 1] if links.size >= k - 1 else links
    return work + 2.0 * float(narrow.sum())
