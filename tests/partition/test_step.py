"""The step-time objective ([Note: step objective] in `partition.algorithms.step`): its weights
agree with the simulator, and the partitioner's split has the least ``lambda B + S`` of every
contiguous split, by brute force, for every schedule."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import partition.algorithms.ties as ties_module
from partition.algorithms.objective import evaluate
from partition.algorithms.problem import IDLE_SHARE, Problem
from partition.algorithms.step import step_lambda, step_weights
from partition.devices import Device
from partition.errors import InfeasibleError
from partition.graph import LinearGraph
from partition.memory import MemoryModel
from partition.schedules.custom import schedule_for
from partition.schedules.names import SCHEDULE_NAMES, stages_per_rank
from partition.schedules.simulate import simulate
from partition.solve import solve
from tests.partition.test_solve import problems

TIES = 1e-12
FAST = settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


def brute_force_step(problem: Problem) -> tuple[float, np.ndarray, np.ndarray] | None:
    """The least ``J = lambda B + S`` over the candidate splits, every split enumerated, with
    each fitting split's bottleneck and idle count: a split is a candidate when no split of a
    bottleneck as small (within ``TIES``) has fewer idle stages."""
    n, k = len(problem.graph), problem.num_stages
    costs, lam = problem.costs, step_lambda(problem)
    rows = []
    tau = IDLE_SHARE * float(costs.P[-1]) / k
    for cut in itertools.combinations(range(1, n), k - 1):
        b = (0, *cut, n)
        mem = [float(costs.memory(s, b[s], b[s + 1])) for s in range(k)]
        if any(m > cap for m, cap in zip(mem, costs.cap, strict=True)):
            continue
        bott = float(costs.split_times(b).max())
        idle = sum(costs.P[i] >= costs.P[j] - tau for i, j in itertools.pairwise(b))
        rows.append((bott, idle, costs.split_units(b) * costs.unit))
    if not rows:
        return None
    bott, idle, total = (np.array(x, dtype=np.float64) for x in zip(*rows, strict=True))
    fewest = np.array([idle[bott <= b * (1 + TIES)].min() for b in bott])
    candidate = idle == fewest
    return float((lam * bott + total)[candidate].min()), bott, fewest


def _j(problem: Problem, bounds: tuple[int, ...]) -> float:
    costs = problem.costs
    bott = float(costs.split_times(bounds).max())
    return step_lambda(problem) * bott + costs.split_units(bounds) * costs.unit


def _check(problem: Problem) -> None:
    step = replace(problem, objective="step")
    if step.num_stages > len(step.graph):
        return
    want = brute_force_step(step)

    def solve_it() -> tuple[int, ...]:
        return solve(
            step.graph,
            step.devices,
            schedule=step.schedule,
            microbatches=step.microbatches,
            virtual=step.virtual,
            memory=step.memory,
            objective="step",
        ).bounds

    if want is None:
        with pytest.raises(InfeasibleError):
            solve_it()
        return
    best, bott, fewest = want
    bounds = solve_it()
    ev = evaluate(step, bounds)
    assert ev.within_shares
    got = _j(step, bounds)
    assert got == pytest.approx(best, rel=1e-9, abs=1e-12 * abs(best)), "not the least step"
    # a candidate: no split of a bottleneck as small has fewer idle stages
    assert ev.idle_stages == int(fewest[bott <= ev.bottleneck * (1 + 1e-9)].min())
    # never worse than the bottleneck objective's split on its own J
    other = solve(
        step.graph,
        step.devices,
        schedule=step.schedule,
        microbatches=step.microbatches,
        virtual=step.virtual,
        memory=step.memory,
        objective="bottleneck",
    ).bounds
    assert got <= _j(step, other) * (1 + 1e-9)
    least = float(bott.min())  # and the bottleneck objective's is the least bottleneck
    assert evaluate(step, other).bottleneck == pytest.approx(least, rel=1e-9, abs=0)
    assert solve_it() == bounds, "not deterministic"


@FAST
@given(problems())
def test_step_objective_equals_brute_force(problem: Problem) -> None:
    _check(problem)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(problems())
def test_step_objective_equals_brute_force_when_ties_are_bisected(problem: Problem) -> None:
    old = ties_module.EDGE_BUDGET
    ties_module.EDGE_BUDGET = -(10**9)
    try:
        _check(problem)
    finally:
        ties_module.EDGE_BUDGET = old


def test_mixed_devices_trade_bottleneck_for_fill() -> None:
    # Few micro-batches on mixed devices: a larger bottleneck that lets the fast devices take
    # more fills and drains faster. The step objective finds it; brute force agrees.
    rng = np.random.default_rng(7)
    traded = 0
    for _ in range(40):
        n = int(rng.integers(6, 11))
        graph = LinearGraph.from_arrays(
            rng.uniform(0.5, 2, n),
            rng.uniform(0, 5, n),
            rng.uniform(0, 2, n),
            rng.uniform(0, 3, n - 1),
        )
        fast = Device(name="fast", memory=10**6, flops=3.0, bandwidth=20.0, latency=0.01)
        slow = replace(fast, name="slow", flops=1.0)
        problem = Problem(
            graph=graph, devices=(fast, slow, fast, slow), schedule="1f1b", microbatches=2
        )
        _check(problem)
        a = solve(graph, problem.devices, microbatches=2, objective="step").evaluation
        b = solve(graph, problem.devices, microbatches=2, objective="bottleneck").evaluation
        traded += a.bottleneck > b.bottleneck * (1 + 1e-9)
    assert traded > 0  # the family exercises the trade


def _random_problem(rng: np.random.Generator, schedule: str) -> Problem:
    """Heterogeneous devices with memory caps and fixed costs, under ``schedule``."""
    virtual = stages_per_rank(schedule, 2 if schedule == "interleaved" else 1)
    count = int(rng.integers(1, 4 if virtual == 1 else 3))
    n = int(rng.integers(count * virtual, 11))
    graph = LinearGraph.from_arrays(
        rng.integers(0, 40, n) / 8,
        rng.integers(0, 80, n).astype(float),
        rng.integers(0, 30, n).astype(float),
        rng.integers(0, 20, n - 1) / 4,
        dispatched=rng.choice([0.0, 1.0, 2.0], n),
    )
    devices = tuple(
        Device(
            name=f"d{d}",
            memory=int(rng.integers(200, 3000)),
            flops=float(rng.choice([0.5, 1.0, 2.0, 3.0])),
            bandwidth=float(rng.choice([1.0, 10.0, 100.0])),
            latency=float(rng.choice([0.0, 0.1, 1.0])),
            dispatch_forward=float(rng.choice([0.0, 0.125])),
            dispatch_backward=float(rng.choice([0.0, 0.3])),
            action_overhead=float(rng.choice([0.0, 1.0])),
        )
        for d in range(count)
    )
    m = int(rng.integers(1, 7))
    if schedule == "interleaved":
        m = count * int(rng.integers(1, 4))
    return Problem(
        graph=graph,
        devices=devices,
        schedule=schedule,
        microbatches=m,
        virtual=virtual,
        memory=MemoryModel(recompute=bool(rng.integers(0, 2))),
    )


@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
def test_every_schedule_equals_brute_force(schedule: str) -> None:
    rng = np.random.default_rng(sum(map(ord, schedule)))
    for _ in range(40):
        _check(_random_problem(rng, schedule))


@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
def test_weights_agree_with_the_simulator_on_balanced_stages(schedule: str) -> None:
    graph = LinearGraph.from_arrays([3.0] * 16, [0.0] * 16, [0.0] * 16, [0.0] * 15)
    for ranks, m in ((2, 4), (4, 8), (3, 6)):
        virtual = 2 if schedule == "interleaved" else 1
        device = Device(name="d", memory=10**6, flops=1.0)
        try:
            built = schedule_for(schedule, ranks, m, virtual)
        except Exception:  # a count the schedule cannot run
            continue
        problem = Problem(
            graph=graph,
            devices=(device,) * ranks,
            schedule=schedule,
            microbatches=m,
            virtual=built.num_stages // ranks,
        )
        alpha, beta = step_weights(problem)
        k = built.num_stages
        sim = simulate(built, forward_time=1.0, backward_time=2.0).step_time  # T = 3
        assert alpha * 3.0 + beta * 3.0 * k == pytest.approx(sim, rel=1e-6)  # rho to 6 digits
        if schedule in ("gpipe", "1f1b"):
            assert (alpha, beta) == pytest.approx((m - 1, 1.0))
