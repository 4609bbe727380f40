"""The least peak memory over the tight stages, by bisection of a cap scale.

The last tie-break (`partition.algorithms.ties`) minimises the peak memory over the splits whose
every stage is *tight* (has the least (idle stages, total time, communication) label; an end's
tight starts have one rank before its first idle start and another from it). When there are too
many tight starts to enumerate, this module bisects a scale ``mu`` of the caps instead: each
step asks whether cut ``n`` is reachable through tight stages within ``mu`` times their caps,
and an unreachable step returns its *event*, the least scale at which more could be reached.
See the **Ties** part of [Note: bottleneck search] in `partition.algorithms.optimal`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from partition.algorithms.objective import Bounds
from partition.algorithms.reach import (
    RTOL,
    BoolArray,
    Frame,
    IntArray,
    Search,
    pairs,
    range_min,
)

__all__ = ["PEAK_RTOL", "TightStage", "bisect_peak"]

PEAK_RTOL = 1e-9
"""Relative precision of the peak memory when it is bisected."""
_INF = math.inf
Int32Array = npt.NDArray[np.int32]


@dataclass
class TightStage:
    """The tight starts of one stage: what the peak bisection needs to walk them again."""

    a: int
    """The first cut of the stage's window of starts."""
    rank: Int32Array
    """Rank of each start's label (idle, total time, communication) among the stage's; -1: none."""
    ends: IntArray
    """The cuts the stage may end at."""
    best: Int32Array
    """The rank of the tight starts of each end that make a working stage; -1 where none."""
    best_idle: Int32Array
    """The rank of the tight starts of each end that make an idle stage; -1 where none."""
    idle_from: IntArray
    """Per end, the first start (a cut) that makes the stage idle (`Costs.idle_from`)."""
    keys: IntArray = field(init=False)
    """``rank * size + position`` of every ranked start, sorted: the starts of one rank in a
    range of positions are a span of it (see `_Step.tight_in`)."""

    def __post_init__(self) -> None:
        ranked = np.flatnonzero(self.rank >= 0)
        self.keys = self.rank[ranked].astype(np.int64) * self.rank.size + ranked
        self.keys.sort()


def bisect_peak(search: Search, stages: list[TightStage], split: Bounds, B: float) -> Bounds:
    """The least peak memory over splits of tight stages, to `PEAK_RTOL`: bisect a cap scale.

    ``split`` is a split of tight stages (the bisection's first upper end). Each step asks
    whether cut ``n`` is reachable through tight stages that fit ``mu`` times their caps
    (`_reach_tight`: range searches, no sparse table unless it fails). When it is, a walk back
    gives a split whose peak becomes the upper end (often the optimum itself); when it is not,
    the step's *event* — the least memory ratio of a tight stage left out from a reached start —
    becomes the lower end, since nothing is reached anew below it.
    """
    best = split
    hi = search.peak(best)
    lo, top = 0.0, hi
    for _ in range(200):
        if top <= lo * (1 + PEAK_RTOL):
            break
        mid = 0.5 * (lo + top)
        masks, event = _reach_tight(search, stages, B, mid)
        if masks is None:
            lo = max(mid, event * (1 - 1e-12))
            continue
        found = _walk_tight(search, stages, masks, B, mid)
        value = search.peak(found)
        if value < hi:
            hi, best = value, found
        top = min(mid, value)
    return best


def _reach_tight(
    search: Search, stages: list[TightStage], B: float, mu: float
) -> tuple[list[BoolArray] | None, float]:
    """The cuts reachable through tight stages within ``mu`` times their caps (None if not
    ``n``), and the event: the least ``mu`` above which more could be reached.

    Per stage: only the reached starts and the ends `Search.window` allows from them at this
    scale (at ``mu < 1`` far fewer than at the tie-break's probe). A tight usable start in the
    sure range exists iff the last usable start of the end's rank before it is at or after
    ``sure(j)`` (a running maximum per rank the ends want, usually one); the band is tested start
    by start.
    """
    bs = B * (1 + RTOL)
    reached = np.ones(1, dtype=np.bool_)
    masks = [reached]
    event = _INF
    for s, st in enumerate(stages):
        # Only the reached starts, and the ends the window allows from them at this scale.
        live = np.flatnonzero(reached & (st.rank >= 0))
        if live.size == 0:
            return None, event
        first, last = int(live[0]), int(live[-1])
        a = st.a + first
        jlo, jhi, _, grow = search.window(s, a, st.a + last, bs, mu)
        event = min(event, grow)
        e0, e1 = int(st.ends.searchsorted(jlo)), int(st.ends.searchsorted(jhi, "right"))
        hit = np.zeros(st.ends.size, dtype=np.bool_)
        if e1 > e0:
            rank = st.rank[first : last + 1]
            j = st.ends[e0:e1]
            step = _Step(
                search=search,
                s=s,
                a=a,
                fr=search.frame(s, a, st.a + last, j, bs, mu),
                usable=reached[first : last + 1] & (rank >= 0),
                rank=rank,
                j=j,
                best=st.best[e0:e1],
                best_idle=st.best_idle[e0:e1],
                z=st.idle_from[e0:e1] - a,
                keys=st.keys,
                width=st.rank.size,
                offset=first,
                mu=mu,
            )
            got, ev = step.hits()
            hit[e0:e1] = got
            event = min(event, ev)
        if not hit.any():
            return None, event
        ends = st.ends
        reached = np.zeros(int(ends[-1] - ends[0]) + 1, dtype=np.bool_)
        reached[ends - ends[0]] = hit
        masks.append(reached)
    return (masks, event) if reached[-1] else (None, event)


@dataclass(frozen=True, eq=False, kw_only=True)
class _Step:
    """One stage of `_reach_tight` at cap scale ``mu``: its usable starts and the ends to test."""

    search: Search
    s: int
    """The stage."""
    a: int
    """The cut of the first start; the starts below are window positions from it."""
    fr: Frame
    """The stage's arrays over the starts and the ends ``j``, at scale ``mu``."""
    usable: BoolArray
    """Per start: reached and tight for some end."""
    rank: Int32Array
    """Per start: the rank of its label; -1 where none."""
    j: IntArray
    """The ends the window admits."""
    best: Int32Array
    """Per end: the rank of its tight starts of a working stage; -1 where none."""
    best_idle: Int32Array
    """Per end: the rank of its tight starts of an idle stage; -1 where none."""
    z: IntArray
    """Per end: its first idle start (position from ``a``): tight starts before it have rank
    ``best``, from it ``best_idle``."""
    keys: IntArray
    """The stage's `TightStage.keys` (positions from the stage's first start)."""
    width: int
    """The stage's number of starts: the ``size`` of ``keys``."""
    offset: int
    """Where position 0 here is in ``keys``' positions."""
    mu: float

    def wanted(self, q: IntArray, i: IntArray) -> Int32Array:
        """The rank a start ``i`` needs to be tight for end ``q`` (pairs of arrays)."""
        return np.where(i < self.z[q], self.best[q], self.best_idle[q])

    def tight_in(self, sides: list[tuple[Int32Array, IntArray, IntArray]]) -> BoolArray:
        """Per end, whether a usable start of rank ``want`` lies in ``[lo, hi]`` (-1: none), for
        each side's ``(want, lo, hi)``: the starts of one rank in a range are a span of the
        sorted keys, and a running count of the usable ones along the keys says whether the
        span holds one."""
        keys, size, stage = self.keys, self.rank.size, np.int64(self.width)
        pos = keys % stage - self.offset
        inside = (pos >= 0) & (pos < size)
        flag = np.zeros(keys.size + 1, dtype=np.int64)
        flag[1:][inside] = self.usable[pos[inside]]
        count = np.cumsum(flag)
        hit = np.zeros(self.j.size, dtype=np.bool_)
        for want, lo, hi in sides:
            ask = (want >= 0) & (lo <= hi)
            if ask.any():
                base = want.astype(np.int64) * stage + self.offset
                first = keys.searchsorted(base + lo, "left")
                last = keys.searchsorted(base + hi, "right")
                hit |= ask & (count[last] > count[first])
        return hit

    def hits(self) -> tuple[BoolArray, float]:
        """Which ends ``j`` a usable start of their best rank reaches within ``mu`` times the
        cap, and the event of those missed (see `_event`)."""
        fr, usable, rank, z = self.fr, self.usable, self.rank, self.z
        best, idle = self.best, self.best_idle
        size = rank.size
        end = np.minimum(self.j - 1 - self.a, size - 1)
        work = np.minimum(end, z - 1)  # the last start of a working stage
        pos = np.arange(size)
        r = np.maximum.accumulate(np.where(usable, pos, -1))[end]
        tlo, tsure = fr.pw.searchsorted(fr.t - fr.tm), fr.pw.searchsorted(fr.t + fr.sure_t)
        lo = np.maximum(tlo, fr.qw.searchsorted(fr.u - fr.mm))
        sure = np.maximum(tsure, fr.qw.searchsorted(fr.u + fr.sure_u))
        hit = self.tight_in([(best, sure, work), (idle, np.maximum(sure, z), end)])
        q, i, _ = pairs(lo, np.minimum(sure - 1, r))
        ok = usable[i] & (rank[i] == self.wanted(q, i))
        ok &= (fr.key[i] >= fr.t[q]) & (fr.mkey[i] >= fr.u[q])
        hit[q[ok]] = True
        missed = np.flatnonzero(~hit & ((best >= 0) | (idle >= 0)))
        if missed.size == 0:
            return hit, _INF
        return hit, self._event(missed, (tlo[missed], tsure[missed], end[missed], r[missed]))

    def _event(self, missed: IntArray, cut: tuple[IntArray, IntArray, IntArray, IntArray]) -> float:
        """The least memory ratio of a stage into one of the ``missed`` ends from a usable tight
        start fast enough for it (all of them too heavy at ``mu``, or the end would be reached).

        ``cut`` holds, per missed end (positions from ``a``): the first start that may be fast
        enough (its link in aside), the first surely fast enough (whatever its link in), the last
        start before the end, and the last usable start before it.
        """
        fr, usable, rank = self.fr, self.usable, self.rank
        cap = self.search.cap[self.s]
        tlo, tsure, end, r = cut
        z = self.z[missed]
        event = _INF
        # Starts that may be fast enough, tested one by one.
        q, i, _ = pairs(tlo, np.minimum(tsure - 1, r))
        ok = usable[i] & (rank[i] == self.wanted(missed[q], i)) & (fr.key[i] >= fr.t[missed[q]])
        if ok.any():
            memory = self.search.costs.memory(self.s, self.a + i[ok], self.j[missed[q[ok]]])
            event = float((memory / cap).min())
        # Starts surely fast enough: the lightest (largest mkey) of the end's rank, a range
        # maximum over the working starts and over the idle ones, each with its own rank.
        sides = (
            (self.best[missed], tsure, np.minimum(end, z - 1)),
            (self.best_idle[missed], np.maximum(tsure, z), end),
        )
        for want, first, last in sides:
            ranged = (first <= last) & (want >= 0)
            for w in np.unique(want[ranged]):
                sel = np.flatnonzero(ranged & (want == w))
                vals = np.where(usable & (rank == w), -fr.mkey, _INF)
                heaviest = range_min(vals, first[sel], last[sel])  # -(largest mkey), inf if none
                u = fr.u[missed[sel]] + cap * self.mu  # a stage's bytes are u + cap mu - mkey
                event = min(event, float(((u + heaviest) / cap).min()))
        return event


def _walk_tight(
    search: Search, stages: list[TightStage], masks: list[BoolArray], B: float, mu: float
) -> Bounds:
    """A split through ``masks`` of tight stages within ``mu`` times their caps, each stage the
    lightest in memory the sets allow (the earliest such start on ties)."""
    bs = B * (1 + RTOL)
    j = search.n
    bounds = [j]
    for s in range(search.k - 1, -1, -1):
        st, mask = stages[s], masks[s]
        a, m = st.a, j - st.a
        e = int(st.ends.searchsorted(j))
        pos = np.arange(min(m, st.rank.size))
        want = np.where(pos < st.idle_from[e] - a, st.best[e], st.best_idle[e])
        fr = search.frame(s, a, a + mask.size - 1, np.array([j], dtype=np.int64), bs, mu)
        ok = mask[:m] & (st.rank[:m] == want) & (fr.key[:m] >= fr.t[0]) & (fr.mkey[:m] >= fr.u[0])
        cand = np.flatnonzero(ok)
        if cand.size == 0:  # pragma: no cover - the forward pass guarantees a start
            raise AssertionError(f"no tight start for stage {s} ending at cut {j}")
        j = a + int(cand[np.argmax(fr.mkey[cand])])
        bounds.append(j)
    return tuple(reversed(bounds))
