"""Reachability under a bottleneck: the probe, its event, the walk back and the index searches,
each against a brute force over every split (stage times and memory in plain Python)."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from partition.algorithms.problem import Problem
from partition.algorithms.reach import RTOL, Search, pairs, range_min
from partition.devices import Device
from partition.graph import LinearGraph
from partition.memory import MemoryModel

FAST = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


# --- a reference in plain Python, from [Note: objective] ------------------------------------


def _link(device: Device, cut: float) -> float:
    return 0.0 if cut == 0 else 2 * (device.latency + cut / device.bandwidth)


def stage_time(problem: Problem, s: int, i: int, j: int) -> float:
    g, k = problem.graph, problem.num_stages
    t = float(sum(g.compute[i:j])) / problem.stage_device(s).flops
    if s > 0:
        t += _link(problem.stage_device(s - 1), float(g.cut_bytes[i]))
    if s < k - 1:
        t += _link(problem.stage_device(s), float(g.cut_bytes[j]))
    return t


def stage_memory(problem: Problem, s: int, i: int, j: int) -> float:
    g = problem.graph
    params = problem.kappa * float(sum(g.param_bytes[i:j]))
    acts = problem.inflight[s] * float(sum(g.saved_bytes[i:j]))
    return params + acts + float(g.cut_bytes[i] + g.cut_bytes[j])


def every_split(problem: Problem) -> list[tuple[tuple[int, ...], float, bool]]:
    """Every split with its bottleneck and whether it fits (a margin of 1e-9 for rounding)."""
    n, k = len(problem.graph), problem.num_stages
    out = []
    for cuts in itertools.combinations(range(1, n), k - 1):
        b = (0, *cuts, n)
        times = [stage_time(problem, s, b[s], b[s + 1]) for s in range(k)]
        fits = all(
            stage_memory(problem, s, b[s], b[s + 1]) <= problem.caps[s] * (1 + 1e-9)
            for s in range(k)
        )
        out.append((b, max(times), fits))
    return out


@st.composite
def problems(draw: st.DrawFn) -> Problem:
    k = draw(st.integers(1, 4))
    n = draw(st.integers(k, 9))
    value = st.integers(0, 40).map(lambda x: x / 4)
    graph = LinearGraph.from_arrays(
        [draw(value) for _ in range(n)],
        [draw(value) * 10 for _ in range(n)],
        [draw(value) * 4 for _ in range(n)],
        [draw(value) * 3 for _ in range(n - 1)],
    )
    devices = tuple(
        Device(
            name=f"d{d}",
            memory=draw(st.integers(40, 1500)),
            flops=draw(st.sampled_from([0.5, 1.0, 3.0])),
            bandwidth=draw(st.sampled_from([1.0, 10.0])),
            latency=draw(st.sampled_from([0.0, 0.25])),
        )
        for d in range(k)
    )
    return Problem(
        graph=graph,
        devices=devices,
        schedule=draw(st.sampled_from(["gpipe", "1f1b"])),
        microbatches=draw(st.integers(1, 4)),
        memory=MemoryModel(optimizer=draw(st.sampled_from(["none", "adam"]))),
    )


def _probe_points(splits: list[tuple[tuple[int, ...], float, bool]]) -> list[float]:
    """Bottlenecks to probe at: each split's, and halfway between neighbouring ones."""
    values = sorted({b for _, b, _ in splits})
    mids = [(x + y) / 2 for x, y in itertools.pairwise(values)]
    return [*values, *mids, values[-1] * 2 + 1]


# --- the probe --------------------------------------------------------------------------------


@FAST
@given(problems())
def test_a_probe_is_feasible_iff_some_split_fits_within_the_bottleneck(problem: Problem) -> None:
    splits = every_split(problem)
    search = Search(problem)
    for B in _probe_points(splits):
        # Stage times within 1e-9 of B count either way: rounding, not the search, decides them.
        surely = any(fits and b <= B * (1 - 1e-9) for _, b, fits in splits)
        maybe = any(fits and b <= B * (1 + 1e-9) for _, b, fits in splits)
        probe = search.probe(B)
        if surely:
            assert probe.feasible, B
        if not maybe:
            assert not probe.feasible, B
        if probe.feasible:  # the walk back gives a split within B that fits
            bounds = search.backtrack(probe, B)
            assert bounds[0] == 0 and bounds[-1] == len(problem.graph)
            assert all(x < y for x, y in itertools.pairwise(bounds))
            k = problem.num_stages
            times = [stage_time(problem, s, bounds[s], bounds[s + 1]) for s in range(k)]
            assert max(times) <= B * (1 + 1e-9)
            assert search.fits(bounds)


@FAST
@given(problems())
def test_an_infeasible_probe_event_is_no_later_than_the_least_bottleneck(problem: Problem) -> None:
    splits = every_split(problem)
    feasible = [b for _, b, fits in splits if fits]
    if not feasible:
        return
    least = min(feasible)
    search = Search(problem)
    for B in _probe_points(splits):
        probe = search.probe(B)
        if not probe.feasible:
            assert least * (1 + 1e-9) > B
            assert probe.event <= least * (1 + 1e-9), (B, probe.event, least)


@FAST
@given(problems())
def test_the_bounds_of_the_search_hold_every_split(problem: Problem) -> None:
    splits = every_split(problem)
    search = Search(problem)
    assert search.lower_bound() <= min(b for _, b, _ in splits) * (1 + 1e-9)
    assert search.max_time() >= max(b for _, b, _ in splits) * (1 - 1e-9)
    guess = search.proportional()
    assert guess[0] == 0 and guess[-1] == len(problem.graph) and len(guess) == len(splits[0][0])
    assert all(x < y for x, y in itertools.pairwise(guess))
    for bounds, bottleneck, fits in splits:
        assert search.fits(bounds) == fits or abs(search.peak(bounds) - 1) < 1e-9
        assert abs(search.bottleneck(bounds) - bottleneck) <= 1e-12 * bottleneck


def test_a_probe_admits_float_noise_on_the_bottleneck() -> None:
    # Two stages of exactly 1.0 s: a probe a hair below 1 (within RTOL) is still feasible.
    graph = LinearGraph.from_arrays([1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0])
    devices = (Device(name="a", memory=10, flops=1.0), Device(name="b", memory=10, flops=1.0))
    search = Search(Problem(graph=graph, devices=devices, schedule="1f1b", microbatches=1))
    assert search.probe(1.0 * (1 - RTOL / 2)).feasible
    assert not search.probe(1.0 * (1 - 4 * RTOL)).feasible
    assert search.probe(0.5).event == 1.0  # the next bottleneck at which anything changes


# --- the index searches -----------------------------------------------------------------------


@given(st.lists(st.tuples(st.integers(0, 12), st.integers(-2, 12)), max_size=8), st.data())
def test_pairs_lists_every_position_in_each_range(
    ranges: list[tuple[int, int]], data: st.DataObject
) -> None:
    lo = np.array([r[0] for r in ranges], dtype=np.int64)
    hi = np.array([r[1] for r in ranges], dtype=np.int64)
    ridx = None
    if data.draw(st.booleans()):
        ridx = np.array(sorted(data.draw(st.sets(st.integers(0, 12)))), dtype=np.int64)
    q, p, offsets = pairs(lo, hi, ridx)
    want = [
        (g, x)
        for g, (a, b) in enumerate(ranges)
        for x in range(a, b + 1)
        if ridx is None or x in set(ridx.tolist())
    ]
    assert list(zip(q.tolist(), p.tolist(), strict=True)) == want
    starts = [i for i, (g, _) in enumerate(want) if i == 0 or want[i - 1][0] != g]
    assert offsets.tolist() == starts


@given(
    st.lists(st.floats(-100, 100), min_size=1, max_size=40),
    st.lists(st.tuples(st.integers(0, 39), st.integers(0, 39)), min_size=1, max_size=10),
)
def test_range_min_is_the_minimum_of_each_range(
    values: list[float], ranges: list[tuple[int, int]]
) -> None:
    n = len(values)
    spans = [(min(a, b) % n, max(a, b) % n) for a, b in ranges]
    spans = [(a, b) if a <= b else (b, a) for a, b in spans]
    lo = np.array([a for a, _ in spans], dtype=np.int64)
    hi = np.array([b for _, b in spans], dtype=np.int64)
    got = range_min(np.array(values, dtype=np.float64), lo, hi)
    assert got.tolist() == [min(values[a : b + 1]) for a, b in spans]
