"""The peak-memory bisection over tight stages, against the least peak of every tied split."""

from __future__ import annotations

import itertools

import numpy as np

from partition.algorithms.optimal import _search_bottleneck
from partition.algorithms.peak import PEAK_RTOL, bisect_peak
from partition.algorithms.problem import Problem
from partition.algorithms.reach import Search
from partition.algorithms.ties import labels
from partition.devices import Device
from partition.graph import LinearGraph


def _tied_peaks(problem: Problem, B: float) -> tuple[float, dict[tuple[int, ...], float]]:
    """The least total time in units over splits within ``B`` that fit with the fewest idle
    stages, and the peak memory of each split that has it and the least communication too (stage
    memory in plain Python)."""
    g, k, n = problem.graph, problem.num_stages, len(problem.graph)
    costs = problem.costs

    def memory(s: int, i: int, j: int) -> float:
        params = problem.kappa * float(sum(g.param_bytes[i:j]))
        acts = problem.inflight[s] * float(sum(g.saved_bytes[i:j]))
        return params + acts + float(g.cut_bytes[i] + g.cut_bytes[j])

    rows = []
    for cuts in itertools.combinations(range(1, n), k - 1):
        b = (0, *cuts, n)
        ratios = [memory(s, b[s], b[s + 1]) / problem.caps[s] for s in range(k)]
        if max(ratios) > 1 or float(costs.split_times(b).max()) > B * (1 + 1e-12):
            continue
        comm = sum(float(g.cut_bytes[x]) for x in cuts)
        rows.append((costs.split_idle(b), costs.split_units(b), comm, b, max(ratios)))
    least = min((e, u, c) for e, u, c, _, _ in rows)
    return least[1], {b: peak for e, u, c, b, peak in rows if (e, u, c) == least}


def test_the_bisected_peak_is_the_least_over_the_tied_splits() -> None:
    # Identical devices and equal cut widths: every split of the least bottleneck ties on total
    # time and communication, so the peak memory alone decides, over many tight starts.
    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(80):
        n, count = int(rng.integers(5, 11)), int(rng.integers(2, 5))
        graph = LinearGraph.from_arrays(
            rng.integers(0, 4, n) / 4 + (np.arange(n) == n - 1) * rng.integers(0, 8),
            rng.integers(0, 50, n).astype(float),
            rng.integers(0, 20, n).astype(float),
            [4.0] * (n - 1),
        )
        device = Device(name="d", memory=int(rng.integers(300, 900)), flops=1.0)
        schedule = str(rng.choice(["gpipe", "1f1b"]))
        problem = Problem(graph=graph, devices=(device,) * count, schedule=schedule, microbatches=4)
        if problem.num_stages > n:
            continue
        search = Search(problem)
        found = _search_bottleneck(search)
        if found is None:
            continue
        B, _ = found
        tight = labels(search, search.probe(B), B, peak=False)
        assert tight is not None
        units, tied = _tied_peaks(problem, B)
        assert tight.units == units and tight.split in tied  # the labels are right to begin with
        split = bisect_peak(search, tight.stages, tight.split, B)
        assert split in tied, (split, sorted(tied))  # a tied split: bisection keeps the labels
        least = min(tied.values())
        assert tied[split] <= least * (1 + 2 * PEAK_RTOL), (tied[split], least)
        assert search.peak(split) <= search.peak(tight.split)
        checked += 1
    assert checked > 40
