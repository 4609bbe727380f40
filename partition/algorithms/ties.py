"""The tie-break among splits of the least bottleneck: least communication, then peak memory.

See the **Ties** part of [Note: bottleneck search] in `partition.algorithms.optimal` and
[Note: what optimal guarantees] in `partition.solve`.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from partition.algorithms.objective import Bounds
from partition.algorithms.reach import RTOL, Probe, Search, pairs

__all__ = ["EDGE_BUDGET", "least_comm", "tie_break"]

EDGE_BUDGET = 2_000_000
"""Most tied starts (beyond one per end) the peak-memory tie-break enumerates before it bisects."""
_INF = math.inf

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def tie_break(search: Search, B: float, fallback: Bounds) -> Bounds:
    """Among splits with bottleneck ``B``, the least communication, then peak memory."""
    probe = search.probe(B)
    if not probe.feasible:  # pragma: no cover - B is the bottleneck of a feasible split
        return fallback
    candidates = [fallback]
    comm, bounds = least_comm(search, probe, B, 1.0, peak=True)
    if bounds is not None:
        candidates.append(bounds)
    elif math.isnan(comm):  # too many ties to enumerate: bisect the peak memory instead
        comm, bounds = least_comm(search, probe, B, 1.0, peak=False)
        if bounds is not None:
            candidates.append(bounds)
            lo, hi = 0.0, search.peak(bounds)
            for _ in range(64):
                if hi <= lo * (1 + 1e-9):
                    break
                mid = 0.5 * (lo + hi)
                value, split = least_comm(search, probe, B, mid, peak=False)
                if split is not None and value <= comm and search.peak(split) <= hi:
                    candidates.append(split)
                    hi = search.peak(split)
                else:
                    lo = mid
    for bounds in reversed(candidates):
        if search.fits(bounds) and search.bottleneck(bounds) <= B * (1 + 4 * RTOL):
            return bounds
    return fallback  # pragma: no cover - the fallback fits


def least_comm(
    search: Search, probe: Probe, B: float, scale: float, peak: bool
) -> tuple[float, Bounds | None]:
    """Least communication through ``probe``'s sets with caps times ``scale``; with ``peak``,
    least (communication, peak memory). Returns (communication, split), or (inf, None) if no
    split is left, or (nan, None) when ``peak`` would enumerate more than `EDGE_BUDGET` ties.
    """
    c, k = search.costs, search.k
    bs = B * (1 + RTOL)
    a = 0
    dist = np.zeros(1)
    pk = np.zeros(1)
    parents: list[tuple[int, IntArray]] = []
    edges = 0
    for s in range(k):
        b = a + dist.size - 1
        nxt_a, nxt_mask = probe.starts[s + 1], probe.masks[s + 1]
        j = nxt_a + np.flatnonzero(nxt_mask)
        fr = search.frame(s, a, b, j, bs, scale)
        finite = np.isfinite(dist)
        ridx = np.flatnonzero(finite)
        end = np.minimum(j - 1, b) - a
        last = np.maximum.accumulate(np.where(finite, np.arange(dist.size, dtype=np.int64), -1))
        r = last[end]
        lo = np.maximum(fr.pw.searchsorted(fr.t - fr.tm), fr.qw.searchsorted(fr.u - fr.mm))
        sure = np.maximum(
            fr.pw.searchsorted(fr.t + fr.sure_t), fr.qw.searchsorted(fr.u + fr.sure_u)
        )
        best = np.full(j.size, _INF)
        has = np.flatnonzero(sure <= end)
        if has.size:
            best[has] = _range_min(dist, sure[has], end[has])
        q, i, starts = pairs(lo, np.minimum(sure - 1, r), ridx)
        ok = np.zeros(q.size, dtype=np.bool_)
        if q.size:
            ok = (fr.key[i] >= fr.t[q]) & (fr.mkey[i] >= fr.u[q])
            vals = np.where(ok, dist[i], _INF)
            g = q[starts]
            best[g] = np.minimum(best[g], np.minimum.reduceat(vals, starts))
        reached = np.isfinite(best)
        byval = _ByValue(dist, ridx)
        hq = np.flatnonzero(reached & (sure <= end))
        p0, p1 = byval.span(best[hq], sure[hq], end[hq])
        bq, bi = q[ok], i[ok]
        keep = dist[bi] == best[bq]
        bq, bi = bq[keep], bi[keep]  # band starts achieving `best`, by position within q
        choice = np.full(j.size, -1, dtype=np.int64)
        peak_j = np.zeros(j.size)
        if peak:
            sq, sp, _ = pairs(p0, p1 - 1)
            edges += sq.size + bq.size - int(reached.sum())  # beyond one start per end
            if edges > EDGE_BUDGET:
                return math.nan, None
            cq = np.concatenate([bq, hq[sq]])
            ci = np.concatenate([bi, byval.position(sp)])
            cand = np.maximum(pk[ci], c.memory(s, a + ci, j[cq]) / search.cap[s])
            first = _first_per_group(cq, np.lexsort((ci, cand, cq)))
            choice[cq[first]] = ci[first]
            peak_j = np.full(j.size, _INF)
            peak_j[cq[first]] = cand[first]
        else:  # the earliest start achieving `best`: in the band if any, else in the sure range
            found = p0 < p1
            choice[hq[found]] = byval.position(p0[found])
            uq, first = np.unique(bq, return_index=True)
            choice[uq] = bi[first]
        span = int(j[-1]) - nxt_a + 1
        add = c.c[j] if s < k - 1 else np.zeros(j.size)
        dist = np.full(span, _INF)
        pk = np.full(span, _INF)
        parent = np.full(span, -1, dtype=np.int64)
        slot = j - nxt_a
        dist[slot] = np.where(reached, best + add, _INF)
        pk[slot] = peak_j
        parent[slot] = np.where(choice >= 0, a + choice, -1)
        parents.append((nxt_a, parent))
        a = nxt_a
        if not np.isfinite(dist).any():
            return _INF, None
    return float(dist[-1]), _walk(search.n, parents)


def _walk(n: int, parents: list[tuple[int, IntArray]]) -> Bounds:
    """The split that the parent pointers give, walked back from cut ``n``."""
    j = n
    bounds = [j]
    for a, parent in reversed(parents):
        j = int(parent[j - a])
        bounds.append(j)
    return tuple(reversed(bounds))


def _first_per_group(q: IntArray, order: IntArray) -> IntArray:
    """The first element of ``order`` for every distinct ``q[order]`` (``q[order]`` sorted)."""
    qs = q[order]
    if qs.size == 0:
        return order
    return order[np.concatenate([[True], qs[1:] != qs[:-1]])]


class _ByValue:
    """The finite entries of ``dist`` sorted by (value, position), to find a value in a range."""

    def __init__(self, dist: FloatArray, ridx: IntArray) -> None:
        vals = dist[ridx]
        self.values = np.unique(vals)
        self.width = dist.size + 1
        self.keys = np.sort(self.values.searchsorted(vals) * self.width + ridx)

    def span(self, value: FloatArray, lo: IntArray, hi: IntArray) -> tuple[IntArray, IntArray]:
        """Index ranges ``[p0, p1)`` of ``keys`` holding ``value`` at positions ``lo..hi``."""
        base = self.values.searchsorted(value) * self.width
        return self.keys.searchsorted(base + lo, "left"), self.keys.searchsorted(base + hi, "right")

    def position(self, p: IntArray) -> IntArray:
        return self.keys[p] % self.width


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
