"""The exact partitioner: the least bottleneck by parametric search over stage reachability.

[Note: bottleneck search]
The objective is in [Note: objective] (`partition.algorithms.objective`). Write, for stage ``s``
and a bottleneck ``B``, ``pw_i = P_i / f_s`` (``X_s`` of [Note: objective] when the device has
fixed costs, whose action overhead then joins every ``t_j``) and::

    key_i  = pw_i - comm_in(c_i)          t_j = pw_j + comm_out(c_j) - B
    mkey_i = Q_i - c_i                    u_j = Q_j + c_j - cap_s   (Q = kappa W + V + inflight_s A)

so that a stage ``[i, j)`` is *valid* iff ``i < j``, ``key_i >= t_j`` (time) and
``mkey_i >= u_j`` (memory). A bottleneck is feasible iff cut ``n`` is reachable after ``k``
stages, starting from cut 0, through valid stages.

**Reachability of one stage** (`partition.algorithms.reach`). The reachable cuts ``R_s`` live in a window ``[a, b]``. For each
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
split found) and bisects between them. It starts from ``lo`` = the largest of four lower bounds
(`Search.lower_bound`: the perfect balance plus each stage's least possible communication, the
first stage's and the last stage's least time on their own, and the largest node on the fastest
device), and ``hi`` = the split proportional to the devices' speeds if that fits (else it climbs
geometrically from ``lo``). The first probe is at ``lo``: when one huge node sets the bottleneck
(an LM head on the last stage), the last-stage bound is ``B*`` and that probe ends the search.
A feasible probe snaps ``hi``
down to the bottleneck of a split recovered by walking the reachable sets back from ``n``, each
stage as fast as the sets allow — often ``B*`` itself. An infeasible probe returns its *next
event*: over the ends it missed, the least ``pw_j + comm_out_j - key_i`` of a reachable start
``i`` that fits (``top(j)`` when ``at(j)`` fits), and the bounds at which pruning would admit a
new cut — a lower bound on the next ``B`` at which anything could change, so ``lo`` jumps to it.
The search stops when ``hi <= lo (1 + 4 RTOL)``: optimal to float noise, with no tolerance to
choose. Events and snapping end it after 10-20 probes in practice (bisection alone would need
about 35 to reach float precision; probing the events themselves was tried and costs more). If
the largest possible stage time is infeasible, no split fits memory (`InfeasibleError`).

**Ties** (`partition.algorithms.ties`). With ``B = hi`` fixed, one more pass over the same
reachable sets minimises (idle stages, total time, communication, peak memory)
lexicographically. Each cut gets the least *label* (idle stages, total time in exact units,
communication) of a prefix ending there: all are sums along a path. A stage ``[i, j)`` is idle
iff ``i >= idle_from(j)``, so each end's starts are two ranges — working before
``idle_from(j)``, idle (count plus one) from it — each searched as below and the better kept;
idle ranges are short and tested start by start, and only where an idle stage could tie. The
total time is separable like ``T_s`` — a start ``i`` extends to
an end ``j`` with the value ``units_i - R_s(i) + L_{s-1}(i)`` plus a term of ``j`` alone — so the
least label into ``j`` is a minimum over its valid starts of one value per start. The starts'
(value, communication) pairs are ranked once per stage (a sort), and the least rank is found as
the least communication was before: every start at or after ``sure(j)`` — the first ``i`` with
``pw_i >= t_j + cin_max`` and ``Q_i >= u_j + c_max``, the window's largest message time and cut
— is valid whatever its own cut, so that part is a range minimum over ``[sure(j), r(j)]`` (a
sparse table), and the band ``[L(j), sure(j))`` is tested start by start. A start is *tight* for
``j`` when it has the least rank; a split has the least label iff all its stages are tight. The
peak memory (a max along the path, so again the best prefix per cut suffices) is then minimised
over the tight stages: enumerated (the tight starts of a sure range are a span of the starts
sorted by (rank, position)), or, past ``EDGE_BUDGET`` tight starts, bisected to ``1e-9``
relative like the bottleneck (`partition.algorithms.peak`): each step asks whether cut ``n`` is reachable through tight
stages within ``mu`` times their caps, over only the reached starts and the ends the window
admits at that scale (per end, the last usable start of its best rank against ``sure(j)``, a
running maximum; the band start by start). A feasible step snaps ``mu`` down to the peak of a
split walked back through the sets (each stage the lightest the sets allow); an infeasible one
returns its event — the least memory ratio of a tight stage from a reached start into an end it
missed, or of an end the window would admit — and the lower end jumps to it. Remaining ties go
to the earliest start, from the last stage back. See [Note: what optimal guarantees] in
`partition.solve`.

Compared with the design note's prototype (a deque per stage, bisection to 1e-4, 0.8 s for 10k
nodes x 64 stages and 7.5 s for 100k x 64): the running-maximum test is exact with the
cut-dependent buffers, the search is exact, events and snapping cut the probes, and each probe
touches only the windows pruning leaves — about 0.14 s and 0.16 s CPU on those sizes here
(`benchmarks/partition_speed`). Worst cases (rows of that benchmark, CPU seconds at 100k nodes
x 64 stages): when one huge node sets the bottleneck, every other stage has slack and the windows
span most of the graph; the last-stage lower bound makes the first probe the last (it took 18),
but the tie-break pass still costs O(k n) vector work with a sort and a sparse table per stage —
1.9 s (was 4.3). If, in addition, every cut has the same width, identical devices tie every split
on time and communication and the peak is bisected: about 15 steps, each trimmed to the windows
the scaled caps allow, 6.3 s (was 30). `min_devices` for a model needing 130 devices: 0.8 s (was
2.6 with 72 probes; now 7).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from partition.algorithms.objective import Bounds
from partition.algorithms.problem import Problem
from partition.algorithms.reach import RTOL, Search
from partition.algorithms.step import least_step
from partition.algorithms.ties import tie_break
from partition.devices import Device
from partition.errors import InfeasibleError
from partition.schedules.names import is_custom
from partition.schedules.placement import stage_rank
from partition.units import format_size

__all__ = ["memory_fits", "min_devices", "optimal_split"]

_MAX_PROBES = 200
_RELAXED_COUNTS = 4096
"""`min_devices` checks the relaxation one count at a time (O(count) each) up to this count."""
_INF = math.inf


# --- the search ---------------------------------------------------------------------------------


def _search_bottleneck(search: Search) -> tuple[float, Bounds] | None:
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


def optimal_split(problem: Problem) -> Bounds:
    """The split with the least bottleneck, then total time, communication and peak memory; or,
    with ``problem.objective == "step"``, the least predicted step ``lambda B + S``.

    See [Note: bottleneck search], [Note: objective] and [Note: step objective].

    Raises:
        InfeasibleError: no split fits the devices; the message names the node that fits no
            device, or the fewest devices that would fit (`min_devices`).
    """
    _check_stage_count(problem)
    search = Search(problem)
    found = _search_bottleneck(search)
    if found is None:
        raise InfeasibleError(_infeasible_message(problem))
    bottleneck, bounds = found
    best = tie_break(search, bottleneck, bounds)
    if problem.objective == "step":  # see [Note: step objective]
        return least_step(search, bottleneck, best)
    return best


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
    search = Search(problem)
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
    stages pay their cuts' buffers), so counts are tried one by one from the first that the
    relaxation `_relaxation_fits` admits (a lower bound, each count checked on its own), for 64
    counts; past that the count grows by a quarter at a time and the last step is bisected. The
    result always fits and one fewer does not; it is the fewest unless a fitting range narrower
    than a quarter lies beyond the first 64 counts.
    """
    if is_custom(problem.schedule):  # a written schedule runs on its own rank count only
        return len(problem.devices) if memory_fits(problem) else None
    n, v = len(problem.graph), problem.virtual
    g = problem.graph
    recompute = problem.memory.recompute  # one micro-batch of activations: [Note: recompute]
    floor = problem.microbatches if problem.schedule == "gpipe" and not recompute else 1
    biggest = max(d.memory for d in problem.devices) / v
    if np.any(problem.kappa * g.param_bytes + g.buffer_bytes + floor * g.saved_bytes > biggest):
        return None  # some node fits no device even alone
    limit = n // v
    m = 1
    while m <= min(limit, _RELAXED_COUNTS) and not _relaxation_fits(problem, m):
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


def _relaxation_fits(problem: Problem, count: int) -> bool:
    """Whether ``count`` devices could hold the model if its bytes could be split freely.

    A split that fits puts parameter state ``kappa W_s`` and activations ``A_s`` on each stage
    with ``kappa W_s + inflight_s A_s <= cap_s``. Dropping contiguity, whole nodes and buffers,
    the most activation bytes the stages can then hold is found by putting the parameter state
    on the stages with the most micro-batches in flight first (where a byte of it displaces the
    fewest activation bytes); if that is less than ``A``, no split fits.
    """
    devices = _devices_for(problem, count)
    v = problem.virtual
    k = count * v
    place = problem.placement
    caps = np.array(
        [devices[stage_rank(s, count, place)].memory / v for s in range(k)], dtype=np.float64
    )
    inflight = np.array(problem.inflight_for(count), dtype=np.float64)
    if problem.memory.recompute:  # one micro-batch's activations (and inputs, left out here)
        inflight = np.ones_like(inflight)
    c = problem.costs
    params, acts = float(c.H[-1]), float(c.A[-1])
    if params > caps.sum():
        return False
    order = np.argsort(-inflight, kind="stable")
    caps, inflight = caps[order], inflight[order]
    before = np.concatenate([[0.0], np.cumsum(caps)[:-1]])
    placed = np.clip(params - before, 0.0, caps)
    return float(((caps - placed) / inflight).sum()) >= acts


def _fits_with(problem: Problem, count: int) -> bool:
    return memory_fits(replace(problem, devices=_devices_for(problem, count)))


def _too_large(problem: Problem) -> tuple[int, int] | None:
    """A node (and the stage it fits best) that fits no stage even alone, without buffers."""
    c, g = problem.costs, problem.graph
    w = problem.kappa * g.param_bytes + g.buffer_bytes
    excess = np.full(len(g), _INF)
    where = np.zeros(len(g), dtype=np.int64)
    for s in range(problem.num_stages):
        e = (w + c.act[s] * g.saved_bytes) - c.cap[s]
        better = e < excess
        excess[better] = e[better]
        where[better] = s
    if excess.max() <= 0:
        return None
    node = int(np.argmax(excess))
    return node, int(where[node])


def _homogeneous(devices: tuple[Device, ...]) -> bool:
    return len({replace(d, name="") for d in devices}) == 1


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith("ch") else "s")


def _infeasible_message(problem: Problem) -> str:
    g, c = problem.graph, problem.costs
    big = _too_large(problem)
    where = f"under {problem.schedule} with {_count(problem.microbatches, 'micro-batch')}"
    v = problem.virtual
    if big is not None:
        node, s = big
        params = problem.kappa * float(g.param_bytes[node]) + float(g.buffer_bytes[node])
        acts = float(c.act[s] * g.saved_bytes[node])
        path = g.module_paths[node] or "(no module)"
        holds = f"the largest stage holds {format_size(float(c.cap.max()))}"
        if v > 1:
            holds += (
                f" (its device's memory over virtual={v}: each interleaved chunk gets an equal "
                "share)"
            )
        return (
            f"node {g.names[node]!r} (module {path}) needs {format_size(params + acts)} on its own "
            f"({format_size(params)} of weights, gradients and optimizer state + {format_size(acts)} of "
            f"activations for {_count(int(c.act[s]), 'micro-batch')} in flight {where}) but "
            f"{holds}: no stage can hold it. Use devices with more memory, fewer micro-batches "
            "in flight, activation checkpointing or a lighter optimizer"
            + (", or fewer virtual stages" if v > 1 else "")
        )
    spec = problem.devices[-1]
    kind = spec.name.rsplit(":", 1)[0] if _homogeneous(problem.devices) else spec.name  # h100:3
    m = min_devices(problem)
    total = float(c.H[-1] + c.A[-1])
    head = (
        f"no split of the {len(g)} nodes fits {len(problem.devices)} device(s) {where}: the model "
        f"needs at least {format_size(total)} (weights, optimizer state and one micro-batch of "
        f"activations) against {format_size(sum(d.memory for d in problem.devices))} in all"
    )
    if m is None:
        return (
            f"{head}, and no number of {kind!r} devices ({format_size(spec.memory)} each) fits: "
            "some stage's received activations and gradients alone exceed a device. Use devices "
            "with more memory or fewer micro-batches"
        )
    if _homogeneous(problem.devices):
        like = f"{kind!r} devices of {format_size(spec.memory)}"
    else:
        like = f"the given devices in order, then copies of the last, {spec.name!r}"
    return (
        f"{head}. The fewest devices that fit is {m} ({like}): use {m} devices, fewer "
        "micro-batches in flight, or activation checkpointing"
    )
