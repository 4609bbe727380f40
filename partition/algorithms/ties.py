"""The tie-break among splits of the least bottleneck: total time, communication, then peak memory.

Labels (least total time, then communication) are found per cut; the peak memory is minimised
over the tight stages, enumerated here or bisected by `partition.algorithms.peak`. See the
**Ties** part of [Note: bottleneck search] in `partition.algorithms.optimal` and
[Note: what optimal guarantees] in `partition.solve`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from partition.algorithms.objective import Bounds
from partition.algorithms.peak import TightStage, bisect_peak
from partition.algorithms.reach import RTOL, Frame, Probe, Search, pairs, range_min

__all__ = ["EDGE_BUDGET", "Labels", "labels", "tie_break"]

EDGE_BUDGET = 2_000_000
"""Most tied starts (beyond one per end) the peak-memory tie-break enumerates before it bisects."""
_INF = math.inf

IntArray = npt.NDArray[np.int64]
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
        candidates.append(bisect_peak(search, tight.stages, tight.split, B))
    for bounds in reversed(candidates):
        if search.fits(bounds) and search.bottleneck(bounds) <= B * (1 + 4 * RTOL):
            return bounds
    return fallback  # pragma: no cover - the fallback fits


# --- the labels: least (total time, communication) per cut ---------------------------------------


@dataclass
class Labels:
    """What `labels` found: the least label at cut ``n`` and a split achieving it."""

    units: float
    """The least total time, in `Costs.unit` (exact)."""
    comm: float
    """The least communication among splits of that total time."""
    split: Bounds
    """With ``peak``, the least peak memory among those, else the earliest starts."""
    stages: list[TightStage]
    """Without ``peak``, the tight starts of every stage."""


def labels(search: Search, probe: Probe, B: float, peak: bool) -> Labels | None:
    """The least (total time, communication) through ``probe``'s sets; with ``peak``, and then
    the least peak memory, or None when that would enumerate more than `EDGE_BUDGET` ties.

    A cut's label is the least (units, comm) of a prefix ending there; a start ``i`` is *tight*
    for an end ``j`` when its label extended by the stage ``[i, j)`` gives ``j``'s label. A split
    has the least label iff every stage of it is tight, so the peak memory is minimised over the
    tight stages only: enumerated here, or bisected by `partition.algorithms.peak.bisect_peak`.
    """
    c, k = search.costs, search.k
    bs = B * (1 + RTOL)
    a = 0
    units, comm, pk = np.zeros(1), np.zeros(1), np.zeros(1)
    parents: Parents = []
    stages: list[TightStage] = []
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
                TightStage(
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
        least[has] = range_min(rankf, sure[has], end[has])
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
