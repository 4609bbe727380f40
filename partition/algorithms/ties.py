"""The tie-break among splits of the least bottleneck: total time, communication, then peak memory.

See the **Ties** part of [Note: bottleneck search] in `partition.algorithms.optimal` and
[Note: what optimal guarantees] in `partition.solve`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from partition.algorithms.objective import Bounds
from partition.algorithms.reach import RTOL, Frame, Probe, Search, pairs

__all__ = ["EDGE_BUDGET", "PEAK_RTOL", "Labels", "labels", "tie_break"]

EDGE_BUDGET = 2_000_000
"""Most tied starts (beyond one per end) the peak-memory tie-break enumerates before it bisects."""
PEAK_RTOL = 1e-9
"""Relative precision of the peak memory when it is bisected."""
_INF = math.inf

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
Parents = list[tuple[int, IntArray]]


def tie_break(search: Search, B: float, fallback: Bounds) -> Bounds:
    """Among splits with bottleneck ``B``: least total time, communication, then peak memory."""
    probe = search.probe(B)
    if not probe.feasible:  # pragma: no cover - B is the bottleneck of a feasible split
        return fallback
    candidates = [fallback]
    exact = labels(search, probe, B, peak=True)
    if exact is not None:
        candidates.append(exact.split)
    else:  # too many ties to enumerate: bisect the peak over the tight edges instead
        tight = labels(search, probe, B, peak=False)
        assert tight is not None
        candidates.append(tight.split)
        candidates.append(_bisect_peak(search, tight, B))
    for bounds in reversed(candidates):
        if search.fits(bounds) and search.bottleneck(bounds) <= B * (1 + 4 * RTOL):
            return bounds
    return fallback  # pragma: no cover - the fallback fits


# --- the labels: least (total time, communication) per cut ---------------------------------------


@dataclass
class _Stage:
    """The tight starts of one stage: what the peak bisection needs to walk them again."""

    a: int
    rank: npt.NDArray[np.int32]
    """Rank of each start's label (total time, communication) among the stage's; -1: none."""
    ends: IntArray
    """The cuts the stage may end at."""
    best: npt.NDArray[np.int32]
    """The rank of the best start of each end; -1 where none."""


@dataclass
class Labels:
    """What `labels` found: the least label at cut ``n`` and a split achieving it."""

    units: float
    """The least total time, in `Costs.unit` (exact)."""
    comm: float
    """The least communication among splits of that total time."""
    split: Bounds
    """With ``peak``, the least peak memory among those, else the earliest starts."""
    stages: list[_Stage]
    """Without ``peak``, the tight starts of every stage."""


def labels(search: Search, probe: Probe, B: float, peak: bool) -> Labels | None:
    """The least (total time, communication) through ``probe``'s sets; with ``peak``, and then
    the least peak memory, or None when that would enumerate more than `EDGE_BUDGET` ties.

    A cut's label is the least (units, comm) of a prefix ending there; a start ``i`` is *tight*
    for an end ``j`` when its label extended by the stage ``[i, j)`` gives ``j``'s label. A split
    has the least label iff every stage of it is tight, so the peak memory is minimised over the
    tight stages only: enumerated here, or bisected by `_bisect_peak`.
    """
    c, k = search.costs, search.k
    bs = B * (1 + RTOL)
    a = 0
    units, comm, pk = np.zeros(1), np.zeros(1), np.zeros(1)
    parents: Parents = []
    stages: list[_Stage] = []
    edges = 0
    for s in range(k):
        size = units.size
        b = a + size - 1
        nxt_a, nxt_mask = probe.starts[s + 1], probe.masks[s + 1]
        j = nxt_a + np.flatnonzero(nxt_mask)
        fr = search.frame(s, a, b, j, bs)
        ridx = np.flatnonzero(np.isfinite(units))
        R, lin, lout = c.time_units(s), c.link_units(s - 1), c.link_units(s)
        # Rank the labels extended by a stage's start: (units - R_s + L_{s-1}, comm), exactly.
        alpha = (units[ridx] - R[a + ridx]) + lin[a + ridx]
        o = np.lexsort((comm[ridx], alpha))
        sa, sc = alpha[o], comm[ridx][o]
        new = np.ones(o.size, dtype=np.bool_)
        new[1:] = (sa[1:] != sa[:-1]) | (sc[1:] != sc[:-1])
        order = ridx[o]
        rank = np.full(size, -1, dtype=np.int64)
        rank[order] = np.cumsum(new) - 1
        t = _tight(fr, a, ridx, rank, order, j)
        best, reached = t.best, t.best >= 0
        pick = np.maximum(best, 0)
        span = int(j[-1]) - nxt_a + 1
        slot = j - nxt_a
        units = np.full(span, _INF)
        units[slot] = np.where(reached, (sa[new][pick] + R[j]) + lout[j], _INF)
        comm = np.full(span, _INF)
        comm[slot] = np.where(reached, sc[new][pick] + (c.c[j] if s < k - 1 else 0.0), _INF)
        parent = np.full(span, -1, dtype=np.int64)
        if peak:
            sq, sp, _ = pairs(t.p0, t.p1 - 1)
            edges += sq.size + t.bq.size - int(reached.sum())  # beyond one start per end
            if edges > EDGE_BUDGET:
                return None
            cq = np.concatenate([t.bq, t.hq[sq]])
            ci = np.concatenate([t.bi, order[sp]])
            cand = np.maximum(pk[ci], c.memory(s, a + ci, j[cq]) / search.cap[s])
            first = _first_per_group(cq, np.lexsort((ci, cand, cq)))
            pk = np.full(span, _INF)
            pk[slot[cq[first]]] = cand[first]
            parent[slot[cq[first]]] = a + ci[first]
        else:  # the earliest tight start: in the band if any, else in the sure range
            choice = np.full(j.size, -1, dtype=np.int64)
            found = t.p0 < t.p1
            choice[t.hq[found]] = order[t.p0[found]]
            uq, first = np.unique(t.bq, return_index=True)
            choice[uq] = t.bi[first]
            parent[slot] = np.where(choice >= 0, a + choice, -1)
            stages.append(
                _Stage(
                    a=a,
                    rank=rank.astype(np.int32),
                    ends=j,
                    best=best.astype(np.int32),
                )
            )
        parents.append((nxt_a, parent))
        a = nxt_a
        if not reached.any():  # pragma: no cover - the probe reached every end
            return None
    return Labels(
        units=float(units[-1]), comm=float(comm[-1]), split=_walk(search.n, parents), stages=stages
    )


@dataclass
class _Ties:
    """The tight starts of every end of one stage: band pairs and spans of the sorted starts."""

    best: IntArray
    """The least rank of a valid start, per end; -1 where none."""
    bq: IntArray
    bi: IntArray
    """Band pairs: ends (by index) and their tight starts (window positions)."""
    hq: IntArray
    p0: IntArray
    p1: IntArray
    """Ends ``hq`` whose sure range holds tight starts ``order[p0:p1]``."""


def _tight(
    fr: Frame,
    a: int,
    ridx: IntArray,
    rank: IntArray,
    order: IntArray,
    j: IntArray,
) -> _Ties:
    """Every end's least rank of a valid start, and its tight starts (those of that rank).

    ``ridx`` are the usable starts (window positions), ``order`` the same sorted by (rank,
    position). Starts at or after ``sure(j)`` are valid whatever their own cut, so the least rank
    there is a range minimum (a sparse table) and the tight ones a span of ``order``; the band
    ``[L(j), sure(j))`` is tested start by start.
    """
    size = rank.size
    end = np.minimum(j - 1 - a, size - 1)
    usable = np.full(size, -1, dtype=np.int64)
    usable[ridx] = ridx
    r = np.maximum.accumulate(usable)[end]  # the last usable start before each end
    lo = np.maximum(fr.pw.searchsorted(fr.t - fr.tm), fr.qw.searchsorted(fr.u - fr.mm))
    sure = np.maximum(fr.pw.searchsorted(fr.t + fr.sure_t), fr.qw.searchsorted(fr.u + fr.sure_u))
    q, i, starts = pairs(lo, np.minimum(sure - 1, r), ridx)
    ok = (fr.key[i] >= fr.t[q]) & (fr.mkey[i] >= fr.u[q])
    ranged = sure <= end
    least = np.full(j.size, _INF)
    has = np.flatnonzero(ranged)
    if has.size:
        rankf = np.full(size, _INF)
        rankf[ridx] = rank[ridx]
        least[has] = _range_min(rankf, sure[has], end[has])
    if q.size:
        g = q[starts]
        vals = np.where(ok, rank[i], _INF)
        least[g] = np.minimum(least[g], np.minimum.reduceat(vals, starts))
    best = np.where(np.isfinite(least), least, -1).astype(np.int64)
    keep = ok & (rank[i] == best[q]) & (best[q] >= 0)
    width = size + 1
    keys = rank[order].astype(np.int64) * width + order
    hq = np.flatnonzero(ranged & (best >= 0))
    base = best[hq] * width
    p0 = keys.searchsorted(base + sure[hq], "left")
    p1 = keys.searchsorted(base + end[hq], "right")
    return _Ties(best=best, bq=q[keep], bi=i[keep], hq=hq, p0=p0, p1=p1)


# --- the peak memory by bisection over the tight stages -----------------------------------------


def _bisect_peak(search: Search, tight: Labels, B: float) -> Bounds:
    """The least peak memory over splits of tight stages, to `PEAK_RTOL`: bisect a cap scale.

    Each step asks whether cut ``n`` is reachable through tight stages that fit ``mu`` times
    their caps (`_reach_tight`: range searches, no sparse table unless it fails). When it is, a
    walk back gives a split whose peak becomes the upper end (often the optimum itself); when it
    is not, the step's *event* — the least memory ratio of a tight stage left out from a reached
    start — becomes the lower end, since nothing is reached anew below it.
    """
    best = tight.split
    hi = search.peak(best)
    lo, top = 0.0, hi
    for _ in range(200):
        if top <= lo * (1 + PEAK_RTOL):
            break
        mid = 0.5 * (lo + top)
        masks, event = _reach_tight(search, tight.stages, B, mid)
        if masks is None:
            lo = max(mid, event * (1 - 1e-12))
            continue
        split = _walk_tight(search, tight.stages, masks, B, mid)
        value = search.peak(split)
        if value < hi:
            hi, best = value, split
        top = min(mid, value)
    return best


def _reach_tight(
    search: Search, stages: list[_Stage], B: float, mu: float
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
        j, best = st.ends[e0:e1], st.best[e0:e1]
        hit = np.zeros(st.ends.size, dtype=np.bool_)
        if j.size:
            rank = st.rank[first : last + 1]
            usable = reached[first : last + 1] & (rank >= 0)
            fr = search.frame(s, a, st.a + last, j, bs, mu)
            got, ev = _hits(search, s, a, fr, usable, rank, j, best, mu)
            hit[e0:e1] = got
            event = min(event, ev)
        if not hit.any():
            return None, event
        ends = st.ends
        reached = np.zeros(int(ends[-1] - ends[0]) + 1, dtype=np.bool_)
        reached[ends - ends[0]] = hit
        masks.append(reached)
    return (masks, event) if reached[-1] else (None, event)


def _hits(
    search: Search,
    s: int,
    a: int,
    fr: Frame,
    usable: BoolArray,
    rank: npt.NDArray[np.int32],
    j: IntArray,
    best: npt.NDArray[np.int32],
    mu: float,
) -> tuple[BoolArray, float]:
    """Which ends ``j`` a usable start of their best rank reaches within ``mu`` times the cap,
    and the event of those missed (see `_event`)."""
    size = rank.size
    end = np.minimum(j - 1 - a, size - 1)
    pos = np.arange(size)
    r = np.maximum.accumulate(np.where(usable, pos, -1))[end]
    tlo, tsure = fr.pw.searchsorted(fr.t - fr.tm), fr.pw.searchsorted(fr.t + fr.sure_t)
    lo = np.maximum(tlo, fr.qw.searchsorted(fr.u - fr.mm))
    sure = np.maximum(tsure, fr.qw.searchsorted(fr.u + fr.sure_u))
    hit = np.zeros(j.size, dtype=np.bool_)
    for want in np.unique(best[best >= 0]):
        last = np.maximum.accumulate(np.where(usable & (rank == want), pos, -1))[end]
        hit |= (best == want) & (last >= sure)
    q, i, _ = pairs(lo, np.minimum(sure - 1, r))
    ok = usable[i] & (rank[i] == best[q])
    ok &= (fr.key[i] >= fr.t[q]) & (fr.mkey[i] >= fr.u[q])
    hit[q[ok]] = True
    missed = np.flatnonzero(~hit & (best >= 0))
    if missed.size == 0:
        return hit, _INF
    cut = (tlo[missed], tsure[missed], end[missed], r[missed])
    return hit, _event(search, s, a, fr, usable, rank, j, best, missed, cut, mu)


def _event(
    search: Search,
    s: int,
    a: int,
    fr: Frame,
    usable: BoolArray,
    rank: npt.NDArray[np.int32],
    j: IntArray,
    best: npt.NDArray[np.int32],
    missed: IntArray,
    cut: tuple[IntArray, IntArray, IntArray, IntArray],
    mu: float,
) -> float:
    """The least memory ratio of a stage into one of the ``missed`` ends from a usable tight
    start fast enough for it (all of them too heavy at ``mu``, or the end would be reached)."""
    cap = search.cap[s]
    tlo, tsure, end, r = cut
    want = best[missed]
    event = _INF
    # Starts that may be fast enough, tested one by one.
    q, i, _ = pairs(tlo, np.minimum(tsure - 1, r))
    ok = usable[i] & (rank[i] == want[q]) & (fr.key[i] >= fr.t[missed[q]])
    if ok.any():
        ratio = search.costs.memory(s, a + i[ok], j[missed[q[ok]]]) / cap
        event = float(ratio.min())
    # Starts surely fast enough: the lightest (largest mkey) of the end's rank, a range maximum.
    ranged = tsure <= end
    for w in np.unique(want[ranged]):
        sel = np.flatnonzero(ranged & (want == w))
        vals = np.where(usable & (rank == w), -fr.mkey, _INF)
        heaviest = _range_min(vals, tsure[sel], end[sel])  # -(largest mkey), inf if none
        u = fr.u[missed[sel]] + cap * mu  # a stage's bytes are u + cap mu - mkey
        event = min(event, float(((u + heaviest) / cap).min()))
    return event


def _walk_tight(
    search: Search, stages: list[_Stage], masks: list[BoolArray], B: float, mu: float
) -> Bounds:
    """A split through ``masks`` of tight stages within ``mu`` times their caps, each stage the
    lightest in memory the sets allow (the earliest such start on ties)."""
    bs = B * (1 + RTOL)
    j = search.n
    bounds = [j]
    for s in range(search.k - 1, -1, -1):
        st, mask = stages[s], masks[s]
        a, m = st.a, j - st.a
        want = st.best[int(st.ends.searchsorted(j))]
        fr = search.frame(s, a, a + mask.size - 1, np.array([j], dtype=np.int64), bs, mu)
        ok = mask[:m] & (st.rank[:m] == want) & (fr.key[:m] >= fr.t[0]) & (fr.mkey[:m] >= fr.u[0])
        cand = np.flatnonzero(ok)
        if cand.size == 0:  # pragma: no cover - the forward pass guarantees a start
            raise AssertionError(f"no tight start for stage {s} ending at cut {j}")
        j = a + int(cand[np.argmax(fr.mkey[cand])])
        bounds.append(j)
    return tuple(reversed(bounds))


def _first_per_group(q: IntArray, order: IntArray) -> IntArray:
    """The first element of ``order`` for every distinct ``q[order]`` (``q[order]`` sorted)."""
    qs = q[order]
    if qs.size == 0:
        return order
    return order[np.concatenate([[True], qs[1:] != qs[:-1]])]


def _walk(n: int, parents: Parents) -> Bounds:
    """The split that the parent pointers give, walked back from cut ``n``."""
    j = n
    bounds = [j]
    for a, parent in reversed(parents):
        j = int(parent[j - a])
        bounds.append(j)
    return tuple(reversed(bounds))


def _range_min(vals: FloatArray, lo: IntArray, hi: IntArray) -> FloatArray:
    """``min(vals[lo..hi])`` (inclusive, non-empty) for each query: a sparse table."""
    span = hi - lo + 1
    top = int(span.max()).bit_length() - 1
    table = np.full((top + 1, vals.size), _INF)
    table[0] = vals
    for level in range(1, top + 1):
        w = 1 << (level - 1)
        np.minimum(
            table[level - 1, : vals.size - w],
            table[level - 1, w:],
            out=table[level, : vals.size - w],
        )
    lv = np.frexp(span.astype(np.float64))[1] - 1  # floor(log2(span)), exact
    return np.minimum(table[lv, lo], table[lv, hi - (1 << lv) + 1])
