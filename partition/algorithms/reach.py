"""Stage-by-stage reachability of cut positions under a bottleneck: the probe of the search.

See [Note: bottleneck search] in `partition.algorithms.optimal` for the method; this module holds
the arrays of one stage, the reachability step with its next event, and the walk back, with the
two index searches the tie-break shares (`pairs`, `range_min`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from partition.algorithms.objective import Bounds
from partition.algorithms.problem import Costs, Problem

__all__ = ["RTOL", "Frame", "Probe", "Search", "pairs", "range_min"]

RTOL = 1e-12
"""Relative slack on stage times: a probe at ``B`` admits ``T <= B (1 + RTOL)`` (float noise)."""
_INF = math.inf

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


@dataclass
class Probe:
    """What one probe at a bottleneck found."""

    feasible: bool
    event: float
    """A lower bound on the least stage time above the probe that could change reachability."""
    starts: list[int]
    masks: list[BoolArray]
    """``masks[s]`` marks the reachable cuts ``starts[s] + x`` after ``s`` stages."""


@dataclass
class Frame:
    """One stage's arrays over a window of starts ``[a, b]`` and a set of ends ``j``."""

    pw: FloatArray
    key: FloatArray
    qw: FloatArray
    mkey: FloatArray
    t: FloatArray
    u: FloatArray
    sure_t: float
    """Added to ``t``: a start whose ``pw`` reaches it is valid in time whatever its cut."""
    sure_u: float
    """Added to ``u``: a start whose ``qw`` reaches it is valid in memory whatever its cut."""
    tm: float
    """Rounding margin of time comparisons."""
    mm: float
    """Rounding margin of memory comparisons."""


def pairs(
    lo: IntArray, hi: IntArray, ridx: IntArray | None = None
) -> tuple[IntArray, IntArray, IntArray]:
    """All ``(q, p)`` with ``lo[q] <= p <= hi[q]`` (``p`` among ``ridx`` if given), grouped by ``q``.

    Returns the query of each pair, the position of each pair and the offset of every non-empty
    group (for ``ufunc.reduceat``).
    """
    if ridx is None:
        p0, cnt = lo, np.maximum(hi - lo + 1, 0)
    else:
        p0 = ridx.searchsorted(lo, "left")
        cnt = np.maximum(ridx.searchsorted(hi, "right") - p0, 0)
    total = int(cnt.sum())
    if total == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    q = np.repeat(np.arange(lo.size, dtype=np.int64), cnt)
    offs = np.cumsum(cnt) - cnt
    pos = np.arange(total, dtype=np.int64) + np.repeat(p0 - offs, cnt)
    return q, (pos if ridx is None else ridx[pos]), offs[cnt > 0]


def range_min(vals: FloatArray, lo: IntArray, hi: IntArray) -> FloatArray:
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


class Search:
    """Reachability probes over one problem, and what the search needs around them."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        c: Costs = problem.costs
        self.costs = c
        self.n, self.k = c.n, c.k
        k = self.k
        self.P, self.c = c.P, c.c
        self.f = [float(x) for x in c.flops]
        self.N = c.N
        self.d = [float(x) for x in c.dispatch]
        self.o = [float(x) for x in c.overhead]
        self.X = [c.prefix_time(s) if self.d[s] or self.o[s] else None for s in range(k)]
        """Per stage with fixed costs, `Costs.prefix_time`; None where ``P / f_s`` alone does."""
        self.cap = [float(x) for x in c.cap]
        self.Q = [c.q(float(c.act[s])) for s in range(k)]
        self.hold = [float(x) for x in c.hold]
        self.cin = [c.link_at(s - 1) for s in range(k)]
        self.cout = [c.link_at(s) for s in range(k)]
        self.frest = [float(c.flops[s + 1 :].sum()) for s in range(k)]
        self.caprest = [float(c.cap[s + 1 :].sum()) for s in range(k)]
        self.qrest = [
            c.q(float(c.act[s + 1 :].min())) if s < k - 1 else self.Q[s] for s in range(k)
        ]

    # --- one stage ---------------------------------------------------------------------------

    def window(
        self, s: int, a: int, b: int, bs: float, scale: float = 1.0
    ) -> tuple[int, int, float, float]:
        """The ends ``[jlo, jhi]`` stage ``s`` may reach from starts ``[a, b]``, and two events:
        the least stage time and the least cap scale above which the window could grow."""
        n, k, P, f = self.n, self.k, self.P, self.f[s]
        jlo, jhi = a + 1, n - (k - 1 - s)
        if s == k - 1:
            jlo = max(jlo, n)
        event = scale_event = _INF
        X, d, o = self.X[s], self.d[s], self.o[s]
        if X is None:
            jt = int(P.searchsorted(P[b] + bs * f, "right")) - 1
        else:
            jt = int(X.searchsorted(X[b] + (bs - o), "right")) - 1
        if jt < jhi:
            jhi = jt
            event = float(P[jt + 1] - P[b]) / f + float(self.N[jt + 1] - self.N[b]) * d + o
        Q, cap = self.Q[s], self.cap[s]
        jm = int(Q.searchsorted(Q[b] + cap * scale * (1 + 1e-12), "right")) - 1
        if jm < jhi:
            jhi = jm
            scale_event = float(Q[jm + 1] - Q[b]) / cap
        if s < k - 1:
            # [Note: compute-only rest] The rest, nodes [j, n), runs on the later stages, each
            # within bs: its compute alone must fit, P_n - P_j <= bs * frest. A stage's time is its
            # compute time plus fixed costs and links, all >= 0, so this holds of every split the
            # fixed costs admit too: a necessary condition, weaker only (it prunes less), and the
            # event it gives, the least bs that admits one more j, is still where it changes.
            jr = int(P.searchsorted(P[n] - bs * self.frest[s], "left"))
            if jr > jlo:
                jlo = jr
                event = min(event, float(P[n] - P[jr - 1]) / self.frest[s])
            Qr, caprest = self.qrest[s], self.caprest[s]
            jq = int(Qr.searchsorted(Qr[n] - caprest * scale * (1 + 1e-12), "left"))
            if jq > jlo:
                jlo = jq
                scale_event = min(scale_event, float(Qr[n] - Qr[jq - 1]) / caprest)
        return jlo, jhi, event, scale_event

    def frame(
        self, s: int, a: int, b: int, j: IntArray | slice, bs: float, scale: float = 1.0
    ) -> Frame:
        """The stage's arrays; ``j`` is an index array or a slice of ends."""
        P, Q, c = self.P, self.Q[s], self.c
        f, cap = self.f[s], self.cap[s] * scale
        pa, qa = P[a], Q[a]
        pw = (P[a : b + 1] - pa) / f
        pj = (P[j] - pa) / f
        if self.X[s] is not None:  # the fixed costs: the overhead joins every end's time
            N, na = self.N, self.N[a]
            pw = pw + (N[a : b + 1] - na) * self.d[s]
            pj = (pj + (N[j] - na) * self.d[s]) + self.o[s]
        cin = self.cin[s][a : b + 1]
        qw = Q[a : b + 1] - qa
        ci = c[a : b + 1] if self.hold[s] == 1.0 else self.hold[s] * c[a : b + 1]
        tm = 1e-13 * (abs(bs) + float(pw[-1]))  # rounding margins, relative to the magnitudes
        mm = 1e-13 * (abs(cap) + float(qw[-1]))
        return Frame(
            pw=pw,
            key=pw - cin,
            qw=qw,
            mkey=qw - ci,
            t=(pj + self.cout[s][j]) - bs,
            u=((Q[j] - qa) + c[j]) - cap,
            sure_t=float(cin.max()) + tm,
            sure_u=float(ci.max()) + mm,
            tm=tm,
            mm=mm,
        )

    def reach_step(
        self, s: int, a: int, mask: BoolArray, bs: float
    ) -> tuple[int, BoolArray | None, float]:
        """The reachable cuts after stage ``s`` from ``mask`` (cuts ``a + x``), and an event."""
        b = a + mask.size - 1
        jlo, jhi, event, _ = self.window(s, a, b, bs)
        if jlo > jhi:
            return jlo, None, event
        fr = self.frame(s, a, b, slice(jlo, jhi + 1), bs)
        full = bool(mask.all())
        local = np.arange(mask.size, dtype=np.int64)
        end = np.minimum(np.arange(jlo - 1 - a, jhi - a, dtype=np.int64), b - a)
        if full:
            r, keys = end, fr.key
        else:
            r = np.maximum.accumulate(np.where(mask, local, -1))[end]
            keys = np.where(mask, fr.key, -_INF)
        # The largest key of a reachable start up to each position, and the last start with it.
        best = np.maximum.accumulate(keys)
        arg = np.maximum.accumulate(np.where(keys >= best, local, -1))
        top, at = best[r], arg[r]
        timely = top >= fr.t  # some reachable start before j is fast enough
        memok = fr.mkey[at] >= fr.u  # ... and the fastest one fits: j is reached
        reach = timely & memok
        # The fastest start does not fit, but another might: test the band start by start.
        maybe = ~memok & (fr.qw[r] >= fr.u - fr.mm)
        ridx = None if full else np.flatnonzero(mask)
        hard = np.flatnonzero(timely & maybe)
        if hard.size:
            self._band(fr, reach, hard, r[hard], ridx)
        # Events: the fastest start sets the time to reach a missed end when it fits (exact),
        # otherwise the fastest start that fits does (found start by start; rare).
        miss = ~reach
        events = ((fr.t + bs) - top)[miss & memok]
        if events.size:
            event = min(event, float(events.min()))
        other = np.flatnonzero(miss & maybe)
        if other.size:
            event = min(event, self._event(fr, other, r[other], ridx, bs))
        hit = np.flatnonzero(reach)
        if hit.size == 0:
            return jlo, None, event
        return jlo + int(hit[0]), reach[hit[0] : hit[-1] + 1], event

    @staticmethod
    def _band(
        fr: Frame, reach: BoolArray, hq: IntArray, r: IntArray, ridx: IntArray | None
    ) -> None:
        """Test the reachable starts in ``[L(j), r(j)]`` of the ends ``hq``; mark those reached."""
        t, u = fr.t[hq], fr.u[hq]
        lo = np.maximum(fr.pw.searchsorted(t - fr.tm), fr.qw.searchsorted(u - fr.mm))
        q, i, _ = pairs(lo, r, ridx)
        ok = (fr.key[i] >= t[q]) & (fr.mkey[i] >= u[q])
        reach[hq[q[ok]]] = True

    @staticmethod
    def _event(fr: Frame, ends: IntArray, r: IntArray, ridx: IntArray | None, bs: float) -> float:
        """The least stage time at which a reachable start that fits would reach one of ``ends``."""
        t, u = fr.t[ends], fr.u[ends]
        q, i, starts = pairs(fr.qw.searchsorted(u - fr.mm), r, ridx)
        if q.size == 0:
            return _INF
        vals = np.where(fr.mkey[i] >= u[q], fr.key[i], -_INF)
        g = q[starts]
        return float(((t[g] + bs) - np.maximum.reduceat(vals, starts)).min())

    # --- probes ------------------------------------------------------------------------------

    def probe(self, B: float) -> Probe:
        """Whether ``B`` is feasible, with the reachable sets and the next event."""
        bs = B * (1 + RTOL)
        a, mask = 0, np.ones(1, dtype=np.bool_)
        starts, masks = [0], [mask]
        event = _INF
        for s in range(self.k):
            a, nxt, ev = self.reach_step(s, a, mask, bs)
            event = min(event, ev)
            if nxt is None:
                return Probe(False, event, starts, masks)
            mask = nxt
            starts.append(a)
            masks.append(mask)
        return Probe(True, event, starts, masks)

    def backtrack(self, probe: Probe, B: float) -> Bounds:
        """A split through ``probe``'s reachable sets, each stage as short in time as allowed."""
        bs = B * (1 + RTOL)
        j = self.n
        bounds = [j]
        for s in range(self.k - 1, -1, -1):
            a, mask = probe.starts[s], probe.masks[s]
            b = a + mask.size - 1
            fr = self.frame(s, a, b, np.array([j], dtype=np.int64), bs)
            ok = mask[: j - a] & (fr.key[: j - a] >= fr.t[0]) & (fr.mkey[: j - a] >= fr.u[0])
            cand = np.flatnonzero(ok)
            if cand.size == 0:  # pragma: no cover - the forward pass guarantees a start
                raise AssertionError(f"no start for stage {s} ending at cut {j}")
            j = a + int(cand[np.argmax(fr.key[cand])])
            bounds.append(j)
        return tuple(reversed(bounds))

    def bottleneck(self, bounds: Bounds) -> float:
        return float(self.costs.split_times(bounds).max())

    def memory_ratios(self, bounds: Bounds) -> FloatArray:
        """``M_s / cap_s`` of every stage of a split."""
        b = np.asarray(bounds, dtype=np.int64)
        c = self.costs
        i, j = b[:-1], b[1:]
        params = c.H[j] - c.H[i]
        acts = c.act * (c.A[j] - c.A[i]) + (c.hold - 1.0) * c.c[i]
        return ((params + acts) + (c.c[i] + c.c[j])) / c.cap

    def fits(self, bounds: Bounds) -> bool:
        b = np.asarray(bounds, dtype=np.int64)
        c = self.costs
        i, j = b[:-1], b[1:]
        params = c.H[j] - c.H[i]
        acts = c.act * (c.A[j] - c.A[i]) + (c.hold - 1.0) * c.c[i]
        return bool(np.all((params + acts) + (c.c[i] + c.c[j]) <= c.cap))

    def peak(self, bounds: Bounds) -> float:
        return float(self.memory_ratios(bounds).max())

    def max_time(self) -> float:
        """An upper bound of every stage time: beyond it, time constrains nothing."""
        c = self.costs
        link = max(float(x.max()) for x in self.cout)
        fixed = max(float(c.N[-1]) * d + o for d, o in zip(self.d, self.o, strict=True))
        return float(c.P[-1]) / min(self.f) + fixed + 2.0 * link

    def lower_bound(self) -> float:
        """A lower bound of every split's bottleneck, the largest of four.

        The perfect balance with each stage's least link in and out,
        ``(sum(compute) + sum_s f_s (least comm in + least comm out)) / sum(f)``; the least time
        of the first stage and of the last stage on their own (whatever the other stages do,
        O(n) each); and the largest node on the fastest device with the least link. The last
        two find the bottleneck when one huge node sets it (an LM head on the last stage), so
        the search's first probe is often feasible at once. Of the fixed costs, the first counts
        each stage's action overhead, the next two all of theirs, the last the least overhead.
        """
        n, k, P, f, N, d, o = self.n, self.k, self.P, self.f, self.N, self.d, self.o
        total = float(P[-1])
        for s in range(k):
            inner = slice(1, n)
            least = float(self.cin[s][inner].min()) if s > 0 and n > 1 else 0.0
            least += float(self.cout[s][inner].min()) if s < self.k - 1 and n > 1 else 0.0
            total += f[s] * (least + o[s])
        bounds = [total / sum(f)]
        if k == 1 or n < k:
            return max(bounds)
        ends = np.arange(1, n - k + 2)  # the first stage ends in [1, n - k + 1]
        first = (P[ends] / f[0] + (N[ends] * d[0] + o[0])) + self.cout[0][ends]
        bounds.append(float(first.min()))
        starts = np.arange(k - 1, n)  # the last stage starts in [k - 1, n - 1]
        last = (P[n] - P[starts]) / f[k - 1] + ((N[n] - N[starts]) * d[k - 1] + o[k - 1])
        bounds.append(float((last + self.cin[k - 1][starts]).min()))
        links = min(float(self.cout[s][1:n].min()) for s in range(k - 1))
        bounds.append(float(np.diff(P).max()) / max(f) + min(o) + links)
        return max(bounds)

    def proportional(self) -> Bounds:
        """Cuts where the compute prefix matches each stage's share of the speed (a first guess)."""
        n, k = self.n, self.k
        share = np.cumsum(self.f)[:-1] / sum(self.f)
        cuts = self.P.searchsorted(share * self.P[-1], "left")
        bounds = [0]
        for s, cut in enumerate(cuts):
            bounds.append(int(min(max(cut, bounds[-1] + 1), n - (k - 1 - s))))
        return (*bounds, n)
