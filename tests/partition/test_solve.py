"""The partitioner: optimal equals brute force, beats the baselines, and explains infeasibility."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import replace
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import partition.algorithms.optimal as optimal_module
import partition.algorithms.ties as ties_module
from partition.algorithms import baselines
from partition.algorithms.objective import evaluate
from partition.algorithms.optimal import memory_fits
from partition.algorithms.problem import IDLE_SHARE, Problem
from partition.devices import Device
from partition.errors import InfeasibleError, PlanError
from partition.graph import LinearGraph
from partition.memory import MemoryModel
from partition.solve import ALGORITHMS, Solution, min_devices, solve

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")
TIES = 1e-12  # splits within this relative bottleneck count as tied (float noise)
FAST = settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


# --- references -----------------------------------------------------------------------------


def brute_force(problem: Problem) -> tuple[float, float, Fraction, float, int] | None:
    """(bottleneck, total time in units, comm bytes (exact), peak memory, idle stages) of the
    best split, enumerating every split: the lexicographic key of [Note: objective] (bottleneck,
    idle stages, units, comm, peak), bottleneck ties within ``TIES``."""
    n, k = len(problem.graph), problem.num_stages
    combos = list(itertools.combinations(range(1, n), k - 1))
    cuts = np.array(combos, dtype=np.int64).reshape(len(combos), k - 1)
    bounds = np.hstack([np.zeros((len(cuts), 1), np.int64), cuts, np.full((len(cuts), 1), n)])
    costs = problem.costs
    times = np.stack([costs.time(s, bounds[:, s], bounds[:, s + 1]) for s in range(k)], axis=1)
    reference = _stage_times(problem, bounds)  # prefix sums cancel: within the largest's noise
    np.testing.assert_allclose(times, reference, rtol=1e-12, atol=1e-12 * reference.max())
    mem = np.stack([costs.memory(s, bounds[:, s], bounds[:, s + 1]) for s in range(k)], axis=1)
    fits = np.all(mem <= costs.cap, axis=1)
    if not fits.any():
        return None
    bottleneck = times.max(axis=1)[fits]
    units = np.array([costs.split_units(b) for b in bounds[fits]])
    # idle: the stage's compute at most tau, P_i >= P_j - tau, pair by pair
    tau = IDLE_SHARE * float(costs.P[-1]) / k
    idle = np.array(
        [
            sum(costs.P[i] >= costs.P[j] - tau for i, j in itertools.pairwise(b))
            for b in bounds[fits]
        ]
    )
    # exact sums: 4 + 1.4e-27 is more communication than 4, though not in float (the solver's
    # labels keep the difference, as exact arithmetic does)
    comm = np.array([_exact_comm(problem, b) for b in bounds[fits]], object)
    peak = (mem / costs.cap).max(axis=1)[fits]
    best = bottleneck.min()
    tied = bottleneck <= best * (1 + TIES)
    fewest_idle = idle[tied].min()
    tied &= idle == fewest_idle
    least = units[tied].min()
    tied &= units == least
    fewest = comm[tied].min()
    tied &= comm == fewest
    return float(best), float(least), fewest, float(peak[tied].min()), int(fewest_idle)


def _stage_times(problem: Problem, bounds: np.ndarray) -> np.ndarray:
    """Every stage time of every split (rows of ``bounds``), node by node from the graph and the
    devices: [Note: objective]'s formula written out apart from `Costs`."""
    g, k = problem.graph, problem.num_stages
    out = np.zeros((len(bounds), k))
    for row, b in enumerate(bounds):
        for s in range(k):
            d, i, j = problem.stage_device(s), int(b[s]), int(b[s + 1])
            t = sum(g.compute[i:j]) / d.flops + d.action_overhead
            t += sum(g.dispatched[i:j]) * (d.dispatch_forward + d.dispatch_backward)
            for cut, link in ((i, s - 1), (j, s)):
                if 0 <= link < k - 1 and g.cut_bytes[cut]:
                    dev = problem.stage_device(link)
                    t += 2 * (dev.latency + dev.message_overhead + g.cut_bytes[cut] / dev.bandwidth)
            out[row, s] = t
    return out


def _exact_comm(problem: Problem, bounds: Sequence[int]) -> Fraction:
    """The bytes crossing the cuts of ``bounds``, summed exactly."""
    return sum((Fraction(problem.costs.c[x]) for x in bounds[1:-1]), Fraction(0))


def dp_bottleneck(problem: Problem) -> float:
    """The least bottleneck by the O(k n^2) dynamic programme (inf if nothing fits)."""
    costs = problem.costs
    n, k = costs.n, costs.k
    best = np.full(n + 1, math.inf)
    best[0] = 0.0
    for s in range(k):
        nxt = np.full(n + 1, math.inf)
        for j in range(1, n + 1):
            if s == k - 1 and j != n:
                continue
            i = np.arange(j)
            jj = np.full(j, j)
            ok = np.isfinite(best[:j]) & (costs.memory(s, i, jj) <= costs.cap[s])
            if ok.any():
                nxt[j] = np.maximum(best[:j], costs.time(s, i, jj))[ok].min()
        best = nxt
    return float(best[n])


# --- random problems ------------------------------------------------------------------------


@st.composite
def problems(draw: st.DrawFn, max_nodes: int = 10, max_stages: int = 4) -> Problem:
    """Heterogeneous devices, every schedule, integer-valued (many exact ties) or real costs."""
    schedule = draw(st.sampled_from(SCHEDULES))
    virtual = draw(st.integers(1, 2)) if schedule == "interleaved" else 1
    count = draw(st.integers(1, max(1, max_stages // virtual)))
    stages = min(count * virtual, max_nodes)
    n = draw(st.integers(stages, max_nodes) | st.integers(1, max_nodes))  # mostly enough nodes
    if draw(st.booleans()):
        value = st.integers(0, 160).map(lambda x: x / 16)  # exact in binary: exact ties
    else:
        value = st.floats(0, 10, allow_subnormal=False)

    def values(size: int, scale: float, zeros: float) -> list[float]:
        out = [draw(value) * scale for _ in range(size)]
        return [0.0 if draw(st.floats(0, 1)) < zeros else x for x in out]

    fixed = draw(st.booleans())  # fixed costs: per operation and per action, 0 on presets
    dispatched = [draw(st.sampled_from([0.0, 1.0, 1.0, 2.0])) for _ in range(n)] if fixed else ()
    graph = LinearGraph.from_arrays(
        values(n, 1.0, 0.1),
        values(n, 10.0, 0.2),
        values(n, 5.0, 0.2),
        values(n - 1, 4.0, 0.2),
        dispatched=dispatched,
    )
    cost = st.sampled_from([0.0, 0.125, 0.3, 1.0]) if fixed else st.just(0.0)
    devices = tuple(
        Device(
            name=f"d{d}",
            memory=draw(st.integers(30, 2500)),
            flops=draw(st.sampled_from([0.5, 1.0, 2.0, 3.0])),
            bandwidth=draw(st.sampled_from([1.0, 10.0, 100.0])),
            latency=draw(st.sampled_from([0.0, 0.1, 1.0])),
            dispatch_forward=draw(cost),
            dispatch_backward=draw(cost),
            action_overhead=draw(cost),
            message_overhead=draw(cost),
        )
        for d in range(count)
    )
    return Problem(
        graph=graph,
        devices=devices,
        schedule=schedule,
        microbatches=draw(st.integers(1, 6)),
        virtual=virtual,
        memory=MemoryModel(optimizer=draw(st.sampled_from(["none", "sgd", "adam"]))),
    )


def _check_against_brute_force(problem: Problem) -> None:
    if problem.num_stages > len(problem.graph):
        with pytest.raises(InfeasibleError, match="at least one node"):
            solve_problem(problem)
        return
    want = brute_force(problem)
    if want is None:
        with pytest.raises(InfeasibleError):
            solve_problem(problem)
        return
    bounds = solve_problem(problem)
    ev = evaluate(problem, bounds)
    assert ev.fits
    assert all(b < c for b, c in itertools.pairwise(bounds)), "a stage is empty"
    assert ev.bottleneck == pytest.approx(want[0], rel=1e-9, abs=0)
    assert ev.idle_stages == want[4], "not the fewest idle stages among the ties"
    assert problem.costs.split_units(bounds) == want[1], "not the least total time among the ties"
    assert _exact_comm(problem, bounds) == want[2], "not the least communication among the S-ties"
    assert ev.peak_memory == pytest.approx(want[3], rel=1e-9, abs=0)
    assert solve_problem(problem) == bounds, "not deterministic"


def solve_problem(problem: Problem) -> tuple[int, ...]:
    return solve(
        problem.graph,
        problem.devices,
        schedule=problem.schedule,
        microbatches=problem.microbatches,
        virtual=problem.virtual,
        memory=problem.memory,
    ).bounds


# --- optimal against the references ---------------------------------------------------------


@FAST
@given(problems())
def test_optimal_equals_brute_force(problem: Problem) -> None:
    _check_against_brute_force(problem)


@settings(max_examples=120, deadline=None, derandomize=True)
@given(problems())
def test_optimal_equals_brute_force_when_ties_are_bisected(problem: Problem) -> None:
    # With no budget the peak-memory tie-break takes its other route: least communication by
    # range minima, then bisection of the peak memory.
    old = ties_module.EDGE_BUDGET
    ties_module.EDGE_BUDGET = -(10**9)
    try:
        _check_against_brute_force(problem)
    finally:
        ties_module.EDGE_BUDGET = old


def test_peak_bisection_equals_brute_force_when_only_the_peak_decides() -> None:
    # Identical devices and equal cut widths: every split of the least bottleneck ties on total
    # time and communication, so the peak memory alone decides; without a budget it is bisected
    # (events, snapping and the walk back all matter, unlike in the small random cases above).
    rng = np.random.default_rng(3)
    old = ties_module.EDGE_BUDGET
    ties_module.EDGE_BUDGET = -(10**9)
    try:
        for _ in range(60):
            n, count = int(rng.integers(5, 12)), int(rng.integers(2, 5))
            graph = LinearGraph.from_arrays(
                rng.integers(0, 4, n) / 4 + (np.arange(n) == n - 1) * rng.integers(0, 8),
                rng.integers(0, 50, n).astype(float),
                rng.integers(0, 20, n).astype(float),
                [4.0] * (n - 1),
            )
            device = Device(name="d", memory=int(rng.integers(300, 900)), flops=1.0)
            schedule = str(rng.choice(["gpipe", "1f1b"]))
            problem = Problem(
                graph=graph, devices=(device,) * count, schedule=schedule, microbatches=4
            )
            _check_against_brute_force(problem)
    finally:
        ties_module.EDGE_BUDGET = old


@settings(max_examples=40, deadline=None, derandomize=True)
@given(problems(max_nodes=60, max_stages=8))
def test_optimal_equals_dynamic_programme_on_larger_graphs(problem: Problem) -> None:
    if problem.num_stages > len(problem.graph):
        return
    want = dp_bottleneck(problem)
    if math.isinf(want):
        with pytest.raises(InfeasibleError):
            solve_problem(problem)
        return
    ev = evaluate(problem, solve_problem(problem))
    assert ev.fits
    assert ev.bottleneck == pytest.approx(want, rel=1e-9, abs=0)


def test_memory_tight_heterogeneous_cases_equal_brute_force() -> None:
    # Caps drawn just around what the model needs, where most splits fail memory.
    rng = np.random.default_rng(0)
    solved = 0
    for _ in range(150):
        n, count = int(rng.integers(4, 11)), int(rng.integers(2, 5))
        graph = LinearGraph.from_arrays(
            rng.uniform(0, 10, n),
            rng.uniform(0, 100, n),
            rng.uniform(0, 40, n),
            rng.uniform(0, 60, n - 1),
        )
        need = 4 * graph.param_bytes.sum() + 4 * graph.saved_bytes.sum()
        devices = tuple(
            Device(
                name=f"d{d}",
                memory=int(need / count * rng.uniform(0.7, 1.4)),
                flops=float(rng.uniform(0.3, 3)),
                bandwidth=float(rng.uniform(1, 50)),
                latency=float(rng.uniform(0, 0.5)),
            )
            for d in range(count)
        )
        schedule = str(rng.choice(SCHEDULES))
        problem = Problem(graph=graph, devices=devices, schedule=schedule, microbatches=4)
        _check_against_brute_force(problem)
        solved += brute_force(problem) is not None
    assert solved > 30  # the family exercises both outcomes


def test_a_wide_cut_makes_the_valid_starts_a_non_interval() -> None:
    # Cut 2 carries a huge tensor: a stage may start at 1 or 3 but not at 2, although 2 lies
    # between them. A sliding window over starts would take the interval [1, 3] and accept 2.
    graph = LinearGraph.from_arrays([1.0] * 6, [0.0] * 6, [0.0] * 6, [1.0, 500.0, 1.0, 1.0, 1.0])
    devices = (
        Device(name="a", memory=10**6, flops=1.0, bandwidth=10.0, latency=0.0),
        Device(name="b", memory=10**6, flops=1.0, bandwidth=10.0, latency=0.0),
    )
    problem = Problem(graph=graph, devices=devices, schedule="1f1b", microbatches=1)
    _check_against_brute_force(problem)
    assert solve(graph, devices).bounds[1] != 2
    # The same through memory: cut 2's receive buffer alone overflows the second device.
    small = (devices[0], replace(devices[1], memory=400))
    _check_against_brute_force(Problem(graph=graph, devices=small, schedule="1f1b", microbatches=1))


def test_ties_go_to_less_communication_then_less_memory() -> None:
    # Node 0 alone sets the bottleneck (5); nodes 1-4 can be split at cut 2, 3 or 4 with the
    # same bottleneck. Links are free (latency 0, bandwidth huge), so only the tie-breaks decide.
    free = Device(name="d", memory=1000, flops=1.0, bandwidth=1e30, latency=0.0)
    none = MemoryModel(optimizer="none")
    widths = LinearGraph.from_arrays([5.0, 1, 1, 1, 1], [0.0] * 5, [0.0] * 5, [1.0, 3.0, 2.0, 3.0])
    sol = solve(widths, [free] * 3, microbatches=1, memory=none)
    assert sol.evaluation.bottleneck == 5.0
    assert sol.bounds == (0, 1, 3, 5)  # cut 3 is the narrowest
    # Equal widths: the peak memory ratio decides. Stage 2 (20 bytes) holds node 4's 9 bytes of
    # weights, its 1-byte buffer and 3 bytes per saved node before it: ending stage 1 at cut 4
    # gives ratios 11/100 and 10/20, the least peak; the earliest cut (2) would give 16/20.
    even = LinearGraph.from_arrays(
        [5.0, 1, 1, 1, 1], [0.0, 0, 0, 0, 9], [0.0, 3, 3, 3, 0], [1.0, 1.0, 1.0, 1.0]
    )
    caps = [free, replace(free, memory=100), replace(free, memory=20)]
    sol = solve(even, caps, microbatches=1, memory=none)
    assert sol.bounds == (0, 1, 4, 5)
    assert sol.evaluation.peak_memory == pytest.approx(0.5)
    _check_against_brute_force(sol.problem)


# --- optimal against the baselines ----------------------------------------------------------


def _simulated_step(problem: Problem, bounds: tuple[int, ...]) -> float:
    """The step time the planner predicts (`partition.planning.model.predict_step`'s arithmetic)."""
    from partition.schedules.actions import build_schedule
    from partition.schedules.simulate import simulate

    ev, g = evaluate(problem, bounds), problem.graph
    k = problem.num_stages
    devices = [problem.stage_device(s) for s in range(k)]
    fwd = [float(g.forward[bounds[s] : bounds[s + 1]].sum()) / devices[s].flops for s in range(k)]
    bwd = [ev.stage_compute_times[s] - fwd[s] for s in range(k)]
    cuts = [float(g.cut_bytes[b]) for b in bounds[1:-1]]
    comm = [d.latency + c / d.bandwidth if c else 0.0 for d, c in zip(devices, cuts, strict=False)]
    built = build_schedule(problem.schedule, k, problem.microbatches)
    return float(simulate(built, forward_time=fwd, backward_time=bwd, comm_time=comm).step_time)


def test_a_bottleneck_tie_goes_to_the_least_total_time() -> None:
    # The bug: GPT-small over 3 H100s + 5 A100s. The LM head, alone on the last (slow) stage,
    # sets the bottleneck of every good split, so millions of splits tie; the old tie-break took
    # the least communication among them and left work on the A100s, and DeepSpeed's `params`
    # split, with the same bottleneck, predicted a faster step (7.2 ms against 8.3). A step takes
    # about (m - 1) B + S, so the tie now goes to the least S = sum of stage times: the fast
    # devices take all they can within B and the slow ones one node each.
    n = 24
    compute = [1.0] * (n - 1) + [6.0]  # the head: 6 s on a slow device, the bottleneck
    params = [1.0] * (n - 1) + [3.0]  # so that `params` also gives the head a stage of its own
    graph = LinearGraph.from_arrays(compute, params, [0.0] * n, [1.0] * (n - 1))
    fast = Device(name="fast", memory=10**6, flops=3.0, bandwidth=1e9, latency=0.0)
    slow = replace(fast, name="slow", flops=1.0)
    problem = Problem(
        graph=graph, devices=(fast,) * 3 + (slow,) * 5, schedule="1f1b", microbatches=8
    )
    best = evaluate(problem, optimal_module.optimal_split(problem))
    deepspeed = evaluate(problem, baselines.params(problem))
    assert deepspeed.fits and best.bottleneck == pytest.approx(deepspeed.bottleneck, rel=1e-12)
    assert best.bounds[3:] == (19, 20, 21, 22, 23, 24)  # 19 units at 3x, then one node each
    assert best.total_time < deepspeed.total_time
    assert _simulated_step(problem, best.bounds) < _simulated_step(problem, deepspeed.bounds)
    _check_against_brute_force(replace(problem, devices=(fast,) * 2 + (slow,) * 3))


def test_a_bottleneck_tie_goes_to_the_fewest_idle_stages() -> None:
    # Issue 18 item 9, GPT-2 small over 8 A100s in miniature: the LM head sets the bottleneck,
    # the inputs, their shape queries and an arange come first with next to no compute between
    # the narrowest cuts. The least total time alone took those cuts, 4 of 8 stages idle; the
    # idle count comes first now, and every stage gets work at the same bottleneck.
    compute = [0.0, 0.0, 0.0, 0.01] + [10.0] * 12 + [50.0]
    cuts = [1.0, 1.0, 1.0, 2.0] + [8.0] * 12
    graph = LinearGraph.from_arrays(compute, [1.0] * 17, [1.0] * 17, cuts)
    device = Device(name="d", memory=10**6, flops=1.0, bandwidth=10.0, latency=0.1)
    problem = Problem(graph=graph, devices=(device,) * 8, schedule="1f1b", microbatches=8)
    best = evaluate(problem, solve_problem(problem))
    assert best.idle_stages == 0 and best.bottleneck == best.stage_times[-1]
    costs, n = problem.costs, len(graph)
    tied = []  # every split of that bottleneck, with its idle count and total time
    for cut in itertools.combinations(range(1, n), 7):
        bounds = (0, *cut, n)
        if costs.split_times(bounds).max() <= best.bottleneck * (1 + TIES):
            tied.append((costs.split_units(bounds), costs.split_idle(bounds)))
    assert min(tied)[1] == 4  # the least total time alone leaves 4 of the 8 idle
    _check_against_brute_force(problem)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(problems(max_nodes=30, max_stages=6))
def test_optimal_is_never_worse_than_a_baseline_that_fits(problem: Problem) -> None:
    if problem.num_stages > len(problem.graph):
        return
    try:
        best = evaluate(problem, optimal_module.optimal_split(problem))
    except InfeasibleError:
        best = None
    for name in ("uniform", "params", "time"):
        bounds = getattr(baselines, name)(problem)
        ev = evaluate(problem, bounds)
        if ev.within_shares:  # interleaved: a split may fit a device but not its shares
            assert best is not None, f"{name} fits but optimal says nothing does"
            assert best.bottleneck <= ev.bottleneck * (1 + 1e-9), name
            if ev.bottleneck <= best.bottleneck * (1 + TIES):  # a tie: S decides
                units = problem.costs.split_units
                assert units(best.bounds) <= units(bounds), name


# --- infeasibility --------------------------------------------------------------------------


def _homogeneous(memory: int, count: int) -> list[Device]:
    return [Device(name="gpu", memory=memory, flops=1e12, bandwidth=1e10, latency=1e-6)] * count


def test_a_node_too_large_for_every_device_is_named() -> None:
    params = [1e6] * 8
    params[5] = 5e9  # x4 for Adam: 20 GB (18.6 GiB), against 16 GB (14.9 GiB) devices
    graph = LinearGraph.from_arrays([1e9] * 8, params, [1e6] * 8, [1e6] * 7)
    graph = replace(graph, module_paths=tuple(f"layers.{i}.mlp" for i in range(8)))
    with pytest.raises(InfeasibleError) as err:
        solve(graph, _homogeneous(16 * 10**9, 4))
    message = str(err.value)
    assert "'n5'" in message and "layers.5.mlp" in message
    assert "needs 18.6 GiB on its own" in message and "holds 14.9 GiB" in message
    problem = Problem(
        graph=graph, devices=tuple(_homogeneous(16 * 10**9, 4)), schedule="1f1b", microbatches=8
    )
    assert min_devices(problem) is None


def test_too_few_devices_says_the_fewest_that_fit() -> None:
    # 40 nodes of 1 GB of weights (4 GB with Adam) and 0.5 GB of activations, 1F1B, 8 micro-batches.
    graph = LinearGraph.from_arrays([1e9] * 40, [1e9] * 40, [5e8] * 40, [1e7] * 39)
    devices = _homogeneous(40 * 10**9, 4)
    with pytest.raises(InfeasibleError) as err:
        solve(graph, devices, microbatches=8)
    problem = Problem(graph=graph, devices=tuple(devices), schedule="1f1b", microbatches=8)
    m = min_devices(problem)
    assert m is not None and m > 4
    assert f"fewest devices that fit is {m}" in str(err.value)
    assert memory_fits(replace(problem, devices=tuple(_homogeneous(40 * 10**9, m))))
    assert not memory_fits(replace(problem, devices=tuple(_homogeneous(40 * 10**9, m - 1))))
    solve(graph, _homogeneous(40 * 10**9, m), microbatches=8)  # and it solves


def test_min_devices_extends_a_heterogeneous_set_with_its_last_device() -> None:
    graph = LinearGraph.from_arrays([1.0] * 20, [1e9] * 20, [0.0] * 20, [0.0] * 19)
    big = Device(name="big", memory=30 * 10**9, flops=1.0)
    small = Device(name="small", memory=10 * 10**9, flops=1.0)
    problem = Problem(graph=graph, devices=(big, small), schedule="1f1b", microbatches=1)
    m = min_devices(problem)  # 80 GB: 28 on the big one (7 nodes), then 8 per small (2 nodes)
    assert m == 8
    with pytest.raises(InfeasibleError, match="then copies of the last, 'small'"):
        solve(graph, [big, small], microbatches=1)


def test_a_device_more_can_break_the_fit() -> None:
    # Found by comparing min_devices with a one-by-one scan: 2 devices fit, 3 do not, because
    # under 1F1B the middle stage of 3 keeps 2 micro-batches in flight where the last of 2 keeps
    # 1. So min_devices must not assume that fitting is monotone in the count.
    graph = LinearGraph.from_arrays(
        [1.0] * 4, [4.0, 3.0, 2.0, 3.0], [0.0, 6.0, 4.0, 0.0], [0.0, 4.0, 7.0]
    )
    device = Device(name="d", memory=18, flops=1.0)
    none = MemoryModel(optimizer="none")
    fits = [
        memory_fits(
            Problem(
                graph=graph, devices=(device,) * m, schedule="1f1b", microbatches=4, memory=none
            )
        )
        for m in (1, 2, 3, 4)
    ]
    assert fits == [False, True, False, False]
    problem = Problem(
        graph=graph, devices=(device,) * 3, schedule="1f1b", microbatches=4, memory=none
    )
    assert min_devices(problem) == 2
    with pytest.raises(InfeasibleError, match="fewest devices that fit is 2"):
        solve(graph, [device] * 3, microbatches=4, memory=none)


def test_min_devices_equals_a_scan_and_its_relaxation_never_rejects_a_fit() -> None:
    # min_devices starts its scan where a fractional relaxation first admits the count; that is
    # only right if the relaxation admits every count that fits.
    rng = np.random.default_rng(4)
    for _ in range(40):
        n = int(rng.integers(4, 16))
        graph = LinearGraph.from_arrays(
            [1.0] * n, rng.uniform(0, 10, n), rng.uniform(0, 10, n), rng.uniform(0, 3, n - 1)
        )
        schedule = str(rng.choice(SCHEDULES))
        virtual = 2 if schedule == "interleaved" else 1
        devices = tuple(
            Device(name=f"d{i}", memory=int(rng.integers(40, 200)), flops=1.0)
            for i in range(int(rng.integers(1, 4)))
        )
        problem = Problem(
            graph=graph,
            devices=devices,
            schedule=schedule,
            microbatches=int(rng.integers(1, 6)),
            virtual=virtual,
            memory=MemoryModel(optimizer="none"),
        )
        fits = [optimal_module._fits_with(problem, m) for m in range(1, len(graph) // virtual + 1)]
        for m, ok in enumerate(fits, start=1):
            assert not ok or optimal_module._relaxation_fits(problem, m), (m, problem)
        scan = fits.index(True) + 1 if True in fits else None
        assert min_devices(problem) == scan


def test_more_stages_than_nodes_is_infeasible_for_every_algorithm() -> None:
    graph = LinearGraph.from_arrays([1.0] * 3, [0.0] * 3, [0.0] * 3, [0.0] * 2)
    for algorithm in ALGORITHMS:
        with pytest.raises(InfeasibleError, match=r"at most 3 devices|only 3 nodes"):
            solve(graph, _homogeneous(10**9, 4), algorithm=algorithm)


# --- the front door and the objective -------------------------------------------------------


def test_unknown_algorithm_lists_the_choices() -> None:
    graph = LinearGraph.from_arrays([1.0], [0.0], [0.0], [])
    with pytest.raises(PlanError, match="optimal, uniform, params, time"):
        solve(graph, _homogeneous(10**9, 1), algorithm="greedy")


def test_problem_validates_its_settings() -> None:
    graph = LinearGraph.from_arrays([1.0, 1.0], [0.0] * 2, [0.0] * 2, [0.0])
    devices = tuple(_homogeneous(10**9, 2))
    with pytest.raises(PlanError, match="needs the interleaved schedule"):
        Problem(graph=graph, devices=devices, schedule="1f1b", microbatches=2, virtual=2)
    with pytest.raises(PlanError, match="at least 1"):
        Problem(graph=graph, devices=devices, schedule="1f1b", microbatches=0)
    with pytest.raises(PlanError, match="no devices"):
        Problem(graph=graph, devices=(), schedule="1f1b", microbatches=1)
    with pytest.raises(PlanError, match="unknown schedule"):
        Problem(graph=graph, devices=devices, schedule="pipedream-2bw", microbatches=1)
    assert (
        Problem(graph=graph, devices=devices, schedule="zero-bubble", microbatches=1).schedule
        == "zb-h1"
    )


def test_evaluate_follows_the_formulas() -> None:
    # Two stages on two devices; every term worked out by hand.
    graph = LinearGraph.from_arrays([4.0, 2.0, 6.0], [10.0, 0.0, 20.0], [1.0, 2.0, 3.0], [7.0, 0.0])
    a = Device(name="a", memory=1000, flops=2.0, bandwidth=7.0, latency=0.5)
    b = Device(name="b", memory=500, flops=3.0, bandwidth=1.0, latency=0.25)
    problem = Problem(
        graph=graph,
        devices=(a, b),
        schedule="gpipe",
        microbatches=3,
        memory=MemoryModel(optimizer="sgd"),
    )
    ev = evaluate(problem, (0, 1, 3))
    comm = 2 * (0.5 + 7.0 / 7.0)  # cut 1 over a's link, there and back
    assert ev.stage_compute_times == (2.0, 8.0 / 3.0)
    assert ev.stage_comm_times == (comm, comm)
    assert ev.bottleneck == pytest.approx(8.0 / 3.0 + comm)
    # kappa = 2 (weights + gradients, SGD), 3 micro-batches in flight (GPipe), buffers c_i + c_j
    assert ev.stage_memory == (2 * 10 + 3 * 1 + 7, 2 * 20 + 3 * 5 + 7)
    assert ev.stage_memory_parts[1] == {
        "weights": 20.0,
        "gradients": 20.0,
        "optimizer": 0.0,
        "activations": 15.0,
        "buffers": 7.0,
    }
    assert ev.comm_bytes == 7.0
    assert ev.fits and ev.peak_memory == pytest.approx(62 / 500)
    assert ev.perfect_balance == pytest.approx(12.0 / 5.0)
    assert ev.balance_ratio == pytest.approx(ev.bottleneck / 2.4)
    with pytest.raises(PlanError, match="empty"):
        evaluate(problem, (0, 3, 3))


def test_interleaved_stages_cycle_the_devices_with_a_share_of_memory() -> None:
    graph = LinearGraph.from_arrays([1.0] * 8, [0.0] * 8, [0.0] * 8, [0.0] * 7)
    devices = (Device(name="a", memory=600, flops=1.0), Device(name="b", memory=900, flops=2.0))
    problem = Problem(
        graph=graph, devices=devices, schedule="interleaved", microbatches=4, virtual=3
    )
    assert problem.num_stages == 6
    assert [problem.stage_device(s).name for s in range(6)] == ["a", "b"] * 3
    assert problem.caps == (200.0, 300.0) * 3
    sol = solve(graph, devices, schedule="interleaved", microbatches=4, virtual=3)
    assert len(sol.bounds) == 7 and sol.evaluation.fits


def test_interleaved_fits_counts_a_devices_chunks_together() -> None:
    # Two devices of 100 bytes, two chunks each (shares of 50). Weights only (no optimizer, no
    # activations, no cuts): chunk memory is the weight bytes of its nodes.
    graph = LinearGraph.from_arrays([1.0] * 4, [60.0, 30.0, 10.0, 20.0], [0.0] * 4, [0.0] * 3)
    devices = (Device(name="a", memory=100, flops=1.0), Device(name="b", memory=100, flops=1.0))
    problem = Problem(
        graph=graph,
        devices=devices,
        schedule="interleaved",
        microbatches=4,
        virtual=2,
        memory=MemoryModel(optimizer="none"),
    )
    # Device a holds nodes 0 and 2 (60 + 10 = 70 <= 100) but node 0 alone passes its share.
    ev = evaluate(problem, (0, 1, 2, 3, 4))
    assert ev.device_memory == (70.0, 50.0) and ev.device_caps == (100.0, 100.0)
    assert ev.fits and not ev.within_shares and ev.peak_memory == pytest.approx(60 / 50)
    # Over a device in total: a's chunks take 60 + 50 (graph with a heavier third node).
    heavy = replace(graph, param_bytes=np.array([60.0, 30.0, 50.0, 20.0]))
    ev = evaluate(replace(problem, graph=heavy), (0, 1, 2, 3, 4))
    assert ev.device_memory == (110.0, 50.0) and not ev.fits
    with pytest.raises(InfeasibleError):  # no split keeps node 0 within a share
        optimal_module.optimal_split(problem)


def test_solution_of_a_large_graph_is_sane() -> None:
    from benchmarks.partition_speed import devices_for, transformer

    graph = transformer(3000, hidden=1024, tokens=2048)
    sol = solve(graph, devices_for(graph, 16))
    assert isinstance(sol, Solution) and sol.algorithm == "optimal"
    ev = sol.evaluation
    assert ev.fits and 1.0 <= ev.balance_ratio < 1.1
    for name in ("uniform", "params", "time"):
        other = solve(graph, devices_for(graph, 16), algorithm=name).evaluation
        assert ev.bottleneck <= other.bottleneck * (1 + 1e-9)
