"""The exact partitioner: the least bottleneck by parametric search over stage reachability.

[Note: bottleneck search]
The objective is in [Note: objective] (`partition.algorithms.objective`). Write, for stage ``s``
and a bottleneck ``B``, ``pw_i = P_i / f_s`` and::

    key_i  = pw_i - comm_in(c_i)          t_j = pw_j + comm_out(c_j) - B
    mkey_i = Q_i - c_i                    u_j = Q_j + c_j - cap_s       (Q = kappa W + inflight_s A)

so that a stage ``[i, j)`` is *valid* iff ``i < j``, ``key_i >= t_j`` (time) and
``mkey_i >= u_j`` (memory). A bottleneck is feasible iff cut ``n`` is reachable after ``k``
stages, starting from cut 0, through valid stages.

**Reachability of one stage.** The reachable cuts ``R_s`` live in a window ``[a, b]``. For each
candidate end ``j`` (a window too, see pruning) let ``r(j)`` be the last reachable cut before
``j``, ``top(j)`` the largest key of a reachable start up to ``r(j)`` and ``at(j)`` the last start
with that key (two running-maximum scans over the window). Then ``j`` is reachable if
``top(j) >= t_j`` and ``at(j)`` fits in memory, and unreachable if ``top(j) < t_j``. Only when the
fastest start does not fit but a slower one might (``Q_r >= u_j``) is ``j`` tested start by start,
over its *band* ``[L(j), r(j)]``, where ``L(j)`` — two binary searches, ``pw_i >= t_j`` and
``Q_i >= u_j`` — bounds every valid start. The cut widths make the valid starts a non-interval
(a wide cut ``i`` has a small ``key_i`` and ``mkey_i`` amid larger ones), so a window or a deque
over starts would be wrong; the scans are exact, need no Fenwick tree, and cost O(w) vector
operations for a window of ``w`` cuts, plus the rare band pairs, all tested in one batch.

**Pruning.** ``j`` is kept only if the stage can still afford it (``P_j - P_b <= B f_s``,
``Q_j - Q_b <= cap_s``, at most ``n - (k - 1 - s)``) and the rest can still fit the remaining
stages (``P_n - P_j <= B * sum of later flops``, and the least parameter and activation bytes of
the rest within the later caps). Near the optimum the windows are a small fraction of ``n``.

**Search.** The optimum ``B*`` is one of the stage times ``T_s(i, j)``. The search keeps
``lo`` (every bottleneck below it is infeasible) and ``hi`` (the exact bottleneck of the best
split found) and bisects between them. It starts from ``lo`` = the perfect balance plus each
stage's least possible communication, and ``hi`` = the split proportional to the devices'
speeds if that fits (else it climbs geometrically from ``lo``). A feasible probe snaps ``hi``
down to the bottleneck of a split recovered by walking the reachable sets back from ``n``, each
stage as fast as the sets allow — often ``B*`` itself. An infeasible probe returns its *next
event*: over the ends it missed, the least ``pw_j + comm_out_j - key_i`` of a reachable start
``i`` that fits (``top(j)`` when ``at(j)`` fits), and the bounds at which pruning would admit a
new cut — a lower bound on the next ``B`` at which anything could change, so ``lo`` jumps to it.
The search stops when ``hi <= lo (1 + 4 RTOL)``: optimal to float noise, with no tolerance to
choose. Events and snapping end it after 10-20 probes in practice (bisection alone would need
about 35 to reach float precision; probing the events themselves was tried and costs more). If
the largest possible stage time is infeasible, no split fits memory (`InfeasibleError`).

**Ties.** With ``B = hi`` fixed, one more pass over the same reachable sets minimises
(communication, peak memory) lexicographically. Both are monotone along a path (a sum and a
max), so the best prefix per cut suffices. Every start at or after ``S(j)`` — the first ``i``
with ``pw_i >= t_j + cin_max`` and ``Q_i >= u_j + c_max``, the window's largest message time and
cut — is valid whatever its own cut, so the least communication into ``j`` is a range minimum
over ``[S(j), r(j)]`` (a sparse table) and a minimum over the band ``[L(j), S(j))``. The starts
achieving it are then enumerated (those in the range by a search among the starts sorted by
value) and the peak decides among them. If that would pass ``EDGE_BUDGET`` tied starts (wide
windows whose cuts weigh the same), the peak is bisected instead, to ``1e-9`` relative, with the
communication held at its least. Remaining ties go to the earliest start, from the last stage
back. See [Note: what optimal guarantees] in `partition.solve`.

Compared with the design note's prototype (a deque per stage, bisection to 1e-4, 0.8 s for 10k
nodes x 64 stages and 7.5 s for 100k x 64): the running-maximum test is exact with the
cut-dependent buffers, the search is exact, events and snapping cut the probes, and each probe
touches only the windows pruning leaves — about 0.15 s and 0.25 s on those sizes here
(`benchmarks/partition_speed`). Worst case: when one huge node sets the bottleneck, every other
stage has slack, the windows span most of the graph and a probe costs O(k n) vector work (about
4 s at 100k nodes x 64 stages; ~30 s if, in addition, every cut has the same width, which sends
the tie-break to its bisection).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from partition.algorithms.objective import Bounds, Costs, Problem
from partition.devices import Device
from partition.errors import InfeasibleError

__all__ = ["EDGE_BUDGET", "RTOL", "memory_fits", "min_devices", "optimal_split"]

RTOL = 1e-12
"""Relative slack on stage times: a probe at ``B`` admits ``T <= B (1 + RTOL)`` (float noise)."""
EDGE_BUDGET = 2_000_000
"""Most tied starts (beyond one per end) the peak-memory tie-break enumerates before it bisects."""
_MAX_PROBES = 200
_INF = math.inf

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


@dataclass
class _Probe:
    feasible: bool
    event: float
    """A lower bound on the least stage time above the probe that could change reachability."""
    starts: list[int]
    masks: list[BoolArray]
    """``masks[s]`` marks the reachable cuts ``starts[s] + x`` after ``s`` stages."""


@dataclass
class _Frame:
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


def _pairs(
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


def _first_per_group(q: IntArray, order: IntArray) -> IntArray:
    """The first element of ``order`` for every distinct ``q[order]`` (``q[order]`` sorted)."""
    qs = q[order]
    if qs.size == 0:
        return order
    return order[np.concatenate([[True], qs[1:] != qs[:-1]])]


class _Search:
    """Reachability probes and the tie-break passes over one problem."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        c: Costs = problem.costs
        self.costs = c
        self.n, self.k = c.n, c.k
        k = self.k
        self.P, self.c = c.P, c.c
        self.f = [float(x) for x in c.flops]
        self.cap = [float(x) for x in c.cap]
        self.Q = [c.q(float(c.inflight[s])) for s in range(k)]
        self.cin = [c.link_at(s - 1) for s in range(k)]
        self.cout = [c.link_at(s) for s in range(k)]
        self.frest = [float(c.flops[s + 1 :].sum()) for s in range(k)]
        self.caprest = [float(c.cap[s + 1 :].sum()) for s in range(k)]
        self.qrest = [
            c.q(float(c.inflight[s + 1 :].min())) if s < k - 1 else self.Q[s] for s in range(k)
        ]

    # --- one stage ---------------------------------------------------------------------------

    def window(
        self, s: int, a: int, b: int, bs: float, scale: float = 1.0
    ) -> tuple[int, int, float]:
        """The ends ``[jlo, jhi]`` stage ``s`` may reach from starts ``[a, b]``, and an event."""
        n, k, P, f = self.n, self.k, self.P, self.f[s]
        jlo, jhi = a + 1, n - (k - 1 - s)
        if s == k - 1:
            jlo = max(jlo, n)
        event = _INF
        jt = int(P.searchsorted(P[b] + bs * f, "right")) - 1
        if jt < jhi:
            jhi = jt
            event = float(P[jt + 1] - P[b]) / f
        Q = self.Q[s]
        jhi = min(jhi, int(Q.searchsorted(Q[b] + self.cap[s] * scale * (1 + 1e-12), "right")) - 1)
        if s < k - 1:
            jr = int(P.searchsorted(P[n] - bs * self.frest[s], "left"))
            if jr > jlo:
                jlo = jr
                event = min(event, float(P[n] - P[jr - 1]) / self.frest[s])
            Qr = self.qrest[s]
            rest = self.caprest[s] * scale * (1 + 1e-12)
            jlo = max(jlo, int(Qr.searchsorted(Qr[n] - rest, "left")))
        return jlo, jhi, event

    def frame(
        self, s: int, a: int, b: int, j: IntArray | slice, bs: float, scale: float = 1.0
    ) -> _Frame:
        """The stage's arrays; ``j`` is an index array or a slice of ends."""
        P, Q, c = self.P, self.Q[s], self.c
        f, cap = self.f[s], self.cap[s] * scale
        pa, qa = P[a], Q[a]
        pw = (P[a : b + 1] - pa) / f
        cin = self.cin[s][a : b + 1]
        qw = Q[a : b + 1] - qa
        ci = c[a : b + 1]
        tm = 1e-13 * (abs(bs) + float(pw[-1]))  # rounding margins, relative to the magnitudes
        mm = 1e-13 * (abs(cap) + float(qw[-1]))
        return _Frame(
            pw=pw,
            key=pw - cin,
            qw=qw,
            mkey=qw - ci,
            t=((P[j] - pa) / f + self.cout[s][j]) - bs,
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
        jlo, jhi, event = self.window(s, a, b, bs)
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
        fr: _Frame, reach: BoolArray, hq: IntArray, r: IntArray, ridx: IntArray | None
    ) -> None:
        """Test the reachable starts in ``[L(j), r(j)]`` of the ends ``hq``; mark those reached."""
        t, u = fr.t[hq], fr.u[hq]
        lo = np.maximum(fr.pw.searchsorted(t - fr.tm), fr.qw.searchsorted(u - fr.mm))
        q, i, _ = _pairs(lo, r, ridx)
        ok = (fr.key[i] >= t[q]) & (fr.mkey[i] >= u[q])
        reach[hq[q[ok]]] = True

    @staticmethod
    def _event(fr: _Frame, ends: IntArray, r: IntArray, ridx: IntArray | None, bs: float) -> float:
        """The least stage time at which a reachable start that fits would reach one of ``ends``."""
        t, u = fr.t[ends], fr.u[ends]
        q, i, starts = _pairs(fr.qw.searchsorted(u - fr.mm), r, ridx)
        if q.size == 0:
            return _INF
        vals = np.where(fr.mkey[i] >= u[q], fr.key[i], -_INF)
        g = q[starts]
        return float(((t[g] + bs) - np.maximum.reduceat(vals, starts)).min())

    # --- probes ------------------------------------------------------------------------------

    def probe(self, B: float) -> _Probe:
        """Whether ``B`` is feasible, with the reachable sets and the next event."""
        bs = B * (1 + RTOL)
        a, mask = 0, np.ones(1, dtype=np.bool_)
        starts, masks = [0], [mask]
        event = _INF
        for s in range(self.k):
            a, nxt, ev = self.reach_step(s, a, mask, bs)
            event = min(event, ev)
            if nxt is None:
                return _Probe(False, event, starts, masks)
            mask = nxt
            starts.append(a)
            masks.append(mask)
        return _Probe(True, event, starts, masks)

    def backtrack(self, probe: _Probe, B: float) -> Bounds:
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
        params = c.kappa * (c.W[j] - c.W[i])
        acts = c.inflight * (c.A[j] - c.A[i])
        return ((params + acts) + (c.c[i] + c.c[j])) / c.cap

    def fits(self, bounds: Bounds) -> bool:
        b = np.asarray(bounds, dtype=np.int64)
        c = self.costs
        i, j = b[:-1], b[1:]
        params = c.kappa * (c.W[j] - c.W[i])
        acts = c.inflight * (c.A[j] - c.A[i])
        return bool(np.all((params + acts) + (c.c[i] + c.c[j]) <= c.cap))

    def peak(self, bounds: Bounds) -> float:
        return float(self.memory_ratios(bounds).max())

    def max_time(self) -> float:
        """An upper bound of every stage time: beyond it, time constrains nothing."""
        c = self.costs
        link = max(float(x.max()) for x in self.cout)
        return float(c.P[-1]) / min(self.f) + 2.0 * link

    def lower_bound(self) -> float:
        """``(sum(compute) + sum_s f_s (least comm in + least comm out)) / sum(f)``."""
        n, total = self.n, float(self.P[-1])
        for s in range(self.k):
            inner = slice(1, n)
            least = float(self.cin[s][inner].min()) if s > 0 and n > 1 else 0.0
            least += float(self.cout[s][inner].min()) if s < self.k - 1 and n > 1 else 0.0
            total += self.f[s] * least
        return total / sum(self.f)

    def proportional(self) -> Bounds:
        """Cuts where the compute prefix matches each stage's share of the speed (a first guess)."""
        n, k = self.n, self.k
        share = np.cumsum(self.f)[:-1] / sum(self.f)
        cuts = self.P.searchsorted(share * self.P[-1], "left")
        bounds = [0]
        for s, cut in enumerate(cuts):
            bounds.append(int(min(max(cut, bounds[-1] + 1), n - (k - 1 - s))))
        return (*bounds, n)

    # --- the tie-break pass ------------------------------------------------------------------

    def comm_pass(
        self, probe: _Probe, B: float, scale: float, peak: bool
    ) -> tuple[float, Bounds | None]:
        """Least communication through ``probe``'s sets with caps times ``scale``; with ``peak``,
        least (communication, peak memory). Returns (communication, split), or (inf, None) if no
        split is left, or (nan, None) when ``peak`` would enumerate more than `EDGE_BUDGET` ties.
        """
        c, k = self.costs, self.k
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
            fr = self.frame(s, a, b, j, bs, scale)
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
            q, i, starts = _pairs(lo, np.minimum(sure - 1, r), ridx)
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
                sq, sp, _ = _pairs(p0, p1 - 1)
                edges += sq.size + bq.size - int(reached.sum())  # beyond one start per end
                if edges > EDGE_BUDGET:
                    return math.nan, None
                cq = np.concatenate([bq, hq[sq]])
                ci = np.concatenate([bi, byval.position(sp)])
                cand = np.maximum(pk[ci], c.memory(s, a + ci, j[cq]) / self.cap[s])
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
        return float(dist[-1]), self._walk(parents)

    def _walk(self, parents: list[tuple[int, IntArray]]) -> Bounds:
        j = self.n
        bounds = [j]
        for a, parent in reversed(parents):
            j = int(parent[j - a])
            bounds.append(j)
        return tuple(reversed(bounds))


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


# --- the search ---------------------------------------------------------------------------------


def _search_bottleneck(search: _Search) -> tuple[float, Bounds] | None:
    """The least feasible bottleneck and a split achieving it, or None if memory never fits."""
    top = search.max_time()
    lb = min(search.lower_bound(), top)
    lo, hi, best = lb * (1 - 2 * RTOL), _INF, None
    guess = search.proportional()
    if search.fits(guess):
        hi, best = search.bottleneck(guess), guess
    B, step = lb, 2.0**-10
    for _ in range(_MAX_PROBES):
        probe = search.probe(B)
        if probe.feasible:  # snap hi down to a split's bottleneck
            bounds = search.backtrack(probe, B)
            value = search.bottleneck(bounds)
            if value < hi:
                hi, best = value, bounds
        else:  # nothing below the next event is feasible either
            if (top <= B or probe.event == _INF) and best is None:
                return None  # no larger bottleneck changes anything: memory never fits
            lo = max(lo, B, probe.event * (1 - 2 * RTOL))
        if hi <= lo * (1 + 4 * RTOL) or hi == 0.0:
            break
        if hi == _INF:
            B = min(max(lo, B) * (1 + step), top) if lo > 0 else top * step
            step *= 4.0
        else:
            B = 0.5 * (lo + hi)
    if best is None:  # pragma: no cover - the climb reaches `top` long before the cap
        probe = search.probe(top)
        if not probe.feasible:
            return None
        best = search.backtrack(probe, top)
        hi = search.bottleneck(best)
    return hi, best


def _tie_break(search: _Search, B: float, fallback: Bounds) -> Bounds:
    """Among splits with bottleneck ``B``, the least communication, then peak memory."""
    probe = search.probe(B)
    if not probe.feasible:  # pragma: no cover - B is the bottleneck of a feasible split
        return fallback
    candidates = [fallback]
    comm, bounds = search.comm_pass(probe, B, 1.0, peak=True)
    if bounds is not None:
        candidates.append(bounds)
    elif math.isnan(comm):  # too many ties to enumerate: bisect the peak memory instead
        comm, bounds = search.comm_pass(probe, B, 1.0, peak=False)
        if bounds is not None:
            candidates.append(bounds)
            lo, hi = 0.0, search.peak(bounds)
            for _ in range(64):
                if hi <= lo * (1 + 1e-9):
                    break
                mid = 0.5 * (lo + hi)
                value, split = search.comm_pass(probe, B, mid, peak=False)
                if split is not None and value <= comm and search.peak(split) <= hi:
                    candidates.append(split)
                    hi = search.peak(split)
                else:
                    lo = mid
    for bounds in reversed(candidates):
        if search.fits(bounds) and search.bottleneck(bounds) <= B * (1 + 4 * RTOL):
            return bounds
    return fallback  # pragma: no cover - the fallback fits


def optimal_split(problem: Problem) -> Bounds:
    """The split with the least bottleneck, then least communication, then peak memory.

    See [Note: bottleneck search] and [Note: objective].

    Raises:
        InfeasibleError: no split fits the devices; the message names the node that fits no
            device, or the fewest devices that would fit (`min_devices`).
    """
    _check_stage_count(problem)
    search = _Search(problem)
    found = _search_bottleneck(search)
    if found is None:
        raise InfeasibleError(_infeasible_message(problem))
    bottleneck, bounds = found
    return _tie_break(search, bottleneck, bounds)


# --- infeasibility ------------------------------------------------------------------------------


def _check_stage_count(problem: Problem) -> None:
    n, k = len(problem.graph), problem.num_stages
    if k > n:
        per = problem.virtual
        raise InfeasibleError(
            f"{k} stages but the graph has only {n} nodes; every stage needs at least one node: "
            f"use at most {n // per} devices" + (f" with virtual={per}" if per > 1 else "")
        )


def memory_fits(problem: Problem) -> bool:
    """Whether some split fits every stage's memory, whatever its time."""
    if problem.num_stages > len(problem.graph):
        return False
    search = _Search(problem)
    return search.probe(search.max_time()).feasible


def _devices_for(problem: Problem, count: int) -> tuple[Device, ...]:
    given = problem.devices
    if count <= len(given):
        return given[:count]
    return given + (given[-1],) * (count - len(given))


def min_devices(problem: Problem) -> int | None:
    """The fewest devices that fit ``problem``'s memory, or None if no count does. Time is ignored.

    The candidates with ``m`` devices are the first ``m`` given devices, then copies of the last
    one (for a homogeneous set: ``m`` copies of the spec). Fitting is not monotone in ``m`` (with
    1F1B every added stage keeps one more micro-batch in flight on each earlier one, and tiny
    stages pay their cuts' buffers), so counts are tried one by one from the first whose total
    memory suffices, for 64 counts; past that the count grows by a quarter at a time and the last
    step is bisected. The result always fits and one fewer does not; it is the fewest unless a
    fitting range narrower than a quarter lies beyond the first 64 counts.
    """
    n, v = len(problem.graph), problem.virtual
    c, g = problem.costs, problem.graph
    floor = problem.microbatches if problem.schedule == "gpipe" else 1
    biggest = max(d.memory for d in problem.devices) / v
    if np.any(problem.kappa * g.param_bytes + floor * g.saved_bytes > biggest):
        return None  # some node fits no device even alone
    need = float(problem.kappa * c.W[-1] + floor * c.A[-1])
    limit = n // v
    m = 1
    while m <= limit and sum(d.memory for d in _devices_for(problem, m)) < need:
        m += 1
    scan = m + 64
    low = m - 1  # does not fit (or is zero)
    while m <= limit and not _fits_with(problem, m):
        low = m
        m = m + 1 if m < scan else max(m + 1, m * 5 // 4)
    if m > limit:
        if low >= limit or not _fits_with(problem, limit):
            return None
        m = limit
    while m - low > 1:  # only after a step of more than one
        mid = (low + m) // 2
        if _fits_with(problem, mid):
            m = mid
        else:
            low = mid
    return m


def _fits_with(problem: Problem, count: int) -> bool:
    return memory_fits(replace(problem, devices=_devices_for(problem, count)))


def _too_large(problem: Problem) -> tuple[int, int] | None:
    """A node (and the stage it fits best) that fits no stage even alone, without buffers."""
    c, g = problem.costs, problem.graph
    w = problem.kappa * g.param_bytes
    excess = np.full(len(g), _INF)
    where = np.zeros(len(g), dtype=np.int64)
    for s in range(problem.num_stages):
        e = (w + c.inflight[s] * g.saved_bytes) - c.cap[s]
        better = e < excess
        excess[better] = e[better]
        where[better] = s
    if excess.max() <= 0:
        return None
    node = int(np.argmax(excess))
    return node, int(where[node])


def _homogeneous(devices: tuple[Device, ...]) -> bool:
    first = devices[0]
    return all(
        (d.memory, d.flops, d.bandwidth, d.latency)
        == (first.memory, first.flops, first.bandwidth, first.latency)
        for d in devices
    )


def _gb(x: float) -> str:
    return f"{x / 1e9:.3g} GB"


def _infeasible_message(problem: Problem) -> str:
    g, c = problem.graph, problem.costs
    big = _too_large(problem)
    where = f"under {problem.schedule} with {problem.microbatches} micro-batches"
    if big is not None:
        node, s = big
        params = problem.kappa * float(g.param_bytes[node])
        acts = float(c.inflight[s] * g.saved_bytes[node])
        path = g.module_paths[node] or "(no module)"
        return (
            f"node {g.names[node]!r} (module {path}) needs {_gb(params + acts)} on its own "
            f"({_gb(params)} of weights, gradients and optimizer state + {_gb(acts)} of "
            f"activations for {int(c.inflight[s])} micro-batches in flight {where}) but the "
            f"largest stage holds {_gb(float(c.cap.max()))}: no device can hold it. Use devices "
            "with more memory, fewer micro-batches in flight, activation checkpointing or a "
            "lighter optimizer"
        )
    spec = problem.devices[-1]
    m = min_devices(problem)
    total = float(problem.kappa * c.W[-1] + c.A[-1])
    head = (
        f"no split of the {len(g)} nodes fits {len(problem.devices)} device(s) {where}: the model "
        f"needs at least {_gb(total)} (weights, optimizer state and one micro-batch of "
        f"activations) against {_gb(sum(d.memory for d in problem.devices))} in all"
    )
    if m is None:
        return (
            f"{head}, and no number of {spec.name!r} devices ({_gb(spec.memory)} each) fits: "
            "some stage's received activations and gradients alone exceed a device. Use devices "
            "with more memory or fewer micro-batches"
        )
    if _homogeneous(problem.devices):
        like = f"{spec.name!r} devices of {_gb(spec.memory)}"
    else:
        like = f"the given devices in order, then copies of the last, {spec.name!r}"
    return (
        f"{head}. The fewest devices that fit is {m} ({like}): use {m} devices, fewer "
        "micro-batches in flight, or activation checkpointing"
    )
