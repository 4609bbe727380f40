"""The tie-break among splits of the least bottleneck: idle stages, total time, communication,
then peak memory.

Labels (least total time, then communication) are found per cut; the peak memory is minimised
over the tight stages, enumerated here or bisected by `partition.algorithms.peak`. See the
**Ties** part of [Note: bottleneck search] in `partition.algorithms.optimal` and
[Note: what optimal guarantees] in `partition.solve`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from partition.algorithms.objective import Bounds
from partition.algorithms.peak import TightStage, bisect_peak
from partition.algorithms.reach import (
    RTOL,
    BoolArray,
    FloatArray,
    Frame,
    Probe,
    Search,
    pairs,
    range_min,
)

__all__ = ["EDGE_BUDGET", "Labels", "labels", "tie_break"]

EDGE_BUDGET = 2_000_000
"""Most tied starts (beyond one per end) the peak-memory tie-break enumerates before it bisects."""
_INF = math.inf
_IDLE_PAIRS = 4
"""Idle starts per window start beyond which `_idle_side` ranks them instead of testing each."""

IntArray = npt.NDArray[np.int64]
Parents = list[tuple[int, IntArray]]


def tie_break(search: Search, B: float, fallback: Bounds) -> Bounds:
    """Among splits with bottleneck ``B``: fewest idle stages, least total time, communication,
    then peak memory."""
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
    top: float = _INF
    """With ``peak``, the least largest ``measure`` of a stage over the splits of the least
    label: the peak memory ratio, or the bottleneck."""


def labels(
    search: Search,
    probe: Probe,
    B: float,
    peak: bool,
    tight: bool = True,
    measure: str = "memory",
    by_comm: bool = True,
) -> Labels | None:
    """The least (idle stages, total time, communication) through ``probe``'s sets; with
    ``peak``, and then the least peak memory (``measure="time"``: the least bottleneck), or None
    when that would enumerate more than `EDGE_BUDGET` ties. Without ``peak``, ``tight=False``
    leaves `Labels.stages` empty (for a caller that needs the label and a split only);
    ``by_comm=False`` leaves the communication out of the label (all zero).

    A cut's label is the least (idle, units, comm) of a prefix ending there; a start ``i`` is
    *tight* for an end ``j`` when its label extended by the stage ``[i, j)`` gives ``j``'s label.
    A split has the least label iff every stage of it is tight, so the peak memory is minimised
    over the tight stages only: enumerated here, or bisected by
    `partition.algorithms.peak.bisect_peak`. The stage ``[i, j)`` is idle iff ``i`` is at or
    after ``idle_from[j]`` (`Costs.idle_from`), so each end's starts are two ranges, the working
    ones before it and the idle ones from it, each searched as one range was before.
    """
    c, k = search.costs, search.k
    bs = B * (1 + RTOL)
    a = 0
    idle, units, comm, pk = np.zeros(1), np.zeros(1), np.zeros(1), np.zeros(1)
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
        # Rank the labels extended by a stage's start: (idle, units - R_s + L_{s-1}, comm), exactly.
        alpha = (units[ridx] - R[a + ridx]) + lin[a + ridx]
        e = idle[ridx]
        mixed = bool(e.size) and bool(e.min() != e.max())  # else the idle counts rank nothing
        o = np.lexsort((comm[ridx], alpha, e) if mixed else (comm[ridx], alpha))
        se, sa, sc = e[o], alpha[o], comm[ridx][o]
        new = np.ones(o.size, dtype=np.bool_)
        new[1:] = (sa[1:] != sa[:-1]) | (sc[1:] != sc[:-1])
        if mixed:
            new[1:] |= se[1:] != se[:-1]
        order = ridx[o]
        rank = np.full(size, -1, dtype=np.int64)
        rank[order] = np.cumsum(new) - 1
        ue, ua, uc = se[new], sa[new], sc[new]
        z = c.idle_from[j] - a  # the first idle start of each end (window positions)
        work = _tight(fr, a, ridx, rank, order, j, None, z - 1)
        # An idle stage adds one to its start's count: it can tie or win only where no working
        # stage ends, or where the best working one has more idle stages than the fewest.
        need = (work.best < 0) | (ue[np.maximum(work.best, 0)] > ue[0])
        rest = _idle_side(fr, a, ridx, rank, order, j, np.where(need, z, j - a))
        # The better side per end: (idle, units, comm) of a working stage against an idle one.
        take0, take1 = _sides(work.best, rest.best, (ue, ua, uc))
        p0, p1 = np.maximum(work.best, 0), np.maximum(rest.best, 0)
        reached = take0 | take1
        pick = np.where(take0, p0, p1)
        span = int(j[-1]) - nxt_a + 1
        slot = j - nxt_a
        idle = np.full(span, _INF)
        idle[slot] = np.where(reached, ue[pick] + np.where(take0, 0.0, 1.0), _INF)
        units = np.full(span, _INF)
        units[slot] = np.where(reached, (ua[pick] + R[j]) + lout[j], _INF)
        comm = np.full(span, _INF)
        width = c.c[j] if s < k - 1 and by_comm else 0.0
        comm[slot] = np.where(reached, uc[pick] + width, _INF)
        parent = np.full(span, -1, dtype=np.int64)
        if peak:
            q0, i0 = _edges(work, take0, order)
            q1, i1 = _edges(rest, take1, order)
            edges += q0.size + q1.size - int(reached.sum())  # beyond one start per end
            if edges > EDGE_BUDGET:
                return None
            cq, ci = np.concatenate([q0, q1]), np.concatenate([i0, i1])
            if measure == "time":
                value = c.time(s, a + ci, j[cq])
            else:
                value = c.memory(s, a + ci, j[cq]) / search.cap[s]
            cand = np.maximum(pk[ci], value)
            first = _first_per_group(cq, np.lexsort((ci, cand, cq)))
            pk = np.full(span, _INF)
            pk[slot[cq[first]]] = cand[first]
            parent[slot[cq[first]]] = a + ci[first]
        else:  # the earliest tight start: a working one if any (they come first)
            choice = np.full(j.size, -1, dtype=np.int64)
            _earliest(rest, take1, order, choice)
            _earliest(work, take0, order, choice)
            parent[slot] = np.where(choice >= 0, a + choice, -1)
        if not peak and tight:
            stages.append(
                TightStage(
                    a=a,
                    rank=rank.astype(np.int32),
                    ends=j,
                    best=np.where(take0, work.best, -1).astype(np.int32),
                    best_idle=np.where(take1, rest.best, -1).astype(np.int32),
                    idle_from=c.idle_from[j],
                )
            )
        parents.append((nxt_a, parent))
        a = nxt_a
        if not reached.any():  # pragma: no cover - the probe reached every end
            return None
    return Labels(
        units=float(units[-1]),
        comm=float(comm[-1]),
        split=_walk(search.n, parents),
        stages=stages,
        top=float(pk[-1]) if peak else _INF,
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
    first: IntArray | None = None,
    last: IntArray | None = None,
) -> _Ties:
    """Every end's least rank of a valid start, and its tight starts (those of that rank).

    ``ridx`` are the usable starts (window positions), ``order`` the same sorted by (rank,
    position). Starts at or after ``sure(j)`` are valid whatever their own cut, so the least rank
    there is a range minimum (a sparse table) and the tight ones a span of ``order``; the band
    ``[L(j), sure(j))`` is tested start by start. Only starts in ``[first, last]`` (per end,
    window positions; all before the end by default) are considered.
    """
    size = rank.size
    end = np.minimum(j - 1 - a, size - 1)
    if last is not None:
        end = np.minimum(end, last)
    usable = np.full(size, -1, dtype=np.int64)
    usable[ridx] = ridx
    r = np.where(end >= 0, np.maximum.accumulate(usable)[np.maximum(end, 0)], -1)  # last usable
    lo = np.maximum(fr.pw.searchsorted(fr.t - fr.tm), fr.qw.searchsorted(fr.u - fr.mm))
    sure = np.maximum(fr.pw.searchsorted(fr.t + fr.sure_t), fr.qw.searchsorted(fr.u + fr.sure_u))
    if first is not None:
        lo, sure = np.maximum(lo, first), np.maximum(sure, first)
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


def _sides(
    b0: IntArray, b1: IntArray, label: tuple[FloatArray, FloatArray, FloatArray]
) -> tuple[BoolArray, BoolArray]:
    """Per end, whether its best working start (rank ``b0``) and its best idle one (``b1``) are
    tight: the least of (idle, units, comm) of the two, the idle one's count plus one."""
    if not (b1 >= 0).any():
        return b0 >= 0, np.zeros(b0.size, dtype=np.bool_)
    ue, ua, uc = label
    p0, p1 = np.maximum(b0, 0), np.maximum(b1, 0)
    e0, e1 = ue[p0], ue[p1] + 1.0
    lt = (e0 < e1) | ((e0 == e1) & ((ua[p0] < ua[p1]) | ((ua[p0] == ua[p1]) & (uc[p0] < uc[p1]))))
    eq = (e0 == e1) & (ua[p0] == ua[p1]) & (uc[p0] == uc[p1])
    return (b0 >= 0) & ((b1 < 0) | lt | eq), (b1 >= 0) & ((b0 < 0) | ~lt)


def _idle_side(
    fr: Frame, a: int, ridx: IntArray, rank: IntArray, order: IntArray, j: IntArray, z: IntArray
) -> _Ties:
    """`_tight` over the idle starts ``[z(j), j)`` of the ends that have any in the window
    (``z(j) = j``: none).

    Idle ranges are short (shape queries, views, small ops: a sliver of compute), so their
    starts are tested one by one, as a band; past `_IDLE_PAIRS` per start `_tight` ranks them.
    """
    end = np.minimum(j - 1 - a, rank.size - 1)
    z = np.maximum(z, 0)
    sub = np.flatnonzero(z <= end)
    best = np.full(j.size, -1, dtype=np.int64)
    empty = np.zeros(0, dtype=np.int64)
    if sub.size == 0:
        return _Ties(best=best, bq=empty, bi=empty, hq=empty, p0=empty, p1=empty)
    if int((end[sub] - z[sub]).sum()) + sub.size > _IDLE_PAIRS * rank.size:
        part = _tight(replace(fr, t=fr.t[sub], u=fr.u[sub]), a, ridx, rank, order, j[sub], z[sub])
        best[sub] = part.best
        return _Ties(
            best=best, bq=sub[part.bq], bi=part.bi, hq=sub[part.hq], p0=part.p0, p1=part.p1
        )
    q, i, starts = pairs(z[sub], end[sub])
    jq = sub[q]
    ok = (rank[i] >= 0) & (fr.key[i] >= fr.t[jq]) & (fr.mkey[i] >= fr.u[jq])
    least = np.minimum.reduceat(np.where(ok, rank[i], _INF), starts)
    best[sub[q[starts]]] = np.where(np.isfinite(least), least, -1)
    keep = ok & (rank[i] == best[jq])
    return _Ties(best=best, bq=jq[keep], bi=i[keep], hq=empty, p0=empty, p1=empty)


def _edges(t: _Ties, keep: BoolArray, order: IntArray) -> tuple[IntArray, IntArray]:
    """The tight (end, start) pairs of the ends ``keep`` marks: the band's, then the spans'."""
    band = keep[t.bq]
    held = keep[t.hq]
    sq, sp, _ = pairs(t.p0[held], t.p1[held] - 1)
    return np.concatenate([t.bq[band], t.hq[held][sq]]), np.concatenate([t.bi[band], order[sp]])


def _earliest(t: _Ties, keep: BoolArray, order: IntArray, choice: IntArray) -> None:
    """Write the earliest tight start of each end ``keep`` marks into ``choice``: in the band if
    any, else in the sure range."""
    found = (t.p0 < t.p1) & keep[t.hq]
    choice[t.hq[found]] = order[t.p0[found]]
    band = keep[t.bq]
    uq, first = np.unique(t.bq[band], return_index=True)
    choice[uq] = t.bi[band][first]


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
