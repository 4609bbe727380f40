"""The baselines: uniform node counts, balanced parameters, torchgpipe's block partition."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from partition.algorithms import baselines
from partition.algorithms.problem import Problem
from partition.devices import Device
from partition.graph import LinearGraph
from partition.solve import solve

DEVICE = Device(name="d", memory=10**12, flops=1.0)


def _problem(compute: list[float], params: list[float] | None = None, k: int = 2) -> Problem:
    n = len(compute)
    graph = LinearGraph.from_arrays(compute, params or [0.0] * n, [0.0] * n, [0.0] * (n - 1))
    return Problem(graph=graph, devices=(DEVICE,) * k, schedule="1f1b", microbatches=1)


def test_uniform_gives_equal_node_counts() -> None:
    assert baselines.uniform(_problem([1.0] * 10, k=3)) == (0, 3, 6, 10)
    assert baselines.uniform(_problem([1.0] * 4, k=4)) == (0, 1, 2, 3, 4)


def test_params_minimises_the_largest_stage_parameters() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, k = int(rng.integers(1, 10)), int(rng.integers(1, 5))
        if k > n:
            continue
        params = [float(x) for x in rng.integers(0, 20, n)]
        bounds = baselines.params(_problem([1.0] * n, params, k))
        prefix = np.concatenate([[0.0], np.cumsum(params)])

        def largest(b: tuple[int, ...], prefix: np.ndarray = prefix) -> float:
            return float(max(prefix[y] - prefix[x] for x, y in itertools.pairwise(b)))

        best = min(largest((0, *cuts, n)) for cuts in itertools.combinations(range(1, n), k - 1))
        assert largest(bounds) == best
        assert all(a < b for a, b in itertools.pairwise(bounds))


def test_time_matches_torchgpipe_examples() -> None:
    # torchgpipe's own tests: blockpartition.solve([1..6], 2) == [[1, 2, 3, 4], [5, 6]] and
    # solve([0, 0], 2) == [[0], [0]].
    assert baselines.time(_problem([1.0, 2, 3, 4, 5, 6])) == (0, 4, 6)
    assert baselines.time(_problem([0.0, 0.0])) == (0, 1, 2)


def _block_partition_reference(sequence: list[float], k: int) -> tuple[int, ...]:
    """The paper's steps, written plainly (slow): normalise, then move single elements."""
    low, span = min(sequence), max(sequence) - min(sequence)
    normal = [(x - low) / span if span else 0.0 for x in sequence]
    n = len(sequence)
    splits = [n // k * (x + 1) for x in range(k - 1)] + [n]

    def size(i: int) -> float:
        return sum(normal[(splits[i - 1] if i else 0) : splits[i]])

    while True:
        p = max(range(k), key=lambda i: (size(i), i))
        while True:
            q = min(range(k), key=lambda i: (size(i), i))
            if size(p) <= size(q) + 1:
                return (0, *splits)
            h = q - 1 if p < q else q + 1
            start = splits[h - 1] if h > 0 else 0
            if splits[h] - start <= 1:
                return (0, *splits)
            if p < q:
                splits[h] -= 1
            else:
                splits[q] += 1
            if p == h:
                break


def test_time_follows_the_block_partition_steps() -> None:
    # Costs from 0 to 8 with both present normalise to multiples of 1/8, so every block sum is
    # exact and the two implementations break ties alike (prefix sums vs sums of slices).
    rng = np.random.default_rng(1)
    for _ in range(300):
        n, k = int(rng.integers(2, 25)), int(rng.integers(1, 6))
        if k > n:
            continue
        seq = [float(x) for x in rng.integers(0, 9, n - 2)]
        seq.insert(int(rng.integers(0, n - 1)), 0.0)
        seq.insert(int(rng.integers(0, n)), 8.0)
        assert baselines.time(_problem(seq, k=k)) == _block_partition_reference(seq, k)


def test_baselines_ignore_memory() -> None:
    graph = LinearGraph.from_arrays([1.0] * 4, [1e9] * 4, [0.0] * 4, [0.0] * 3)
    small = Device(name="small", memory=10**6, flops=1.0)
    for algorithm in ("uniform", "params", "time"):
        sol = solve(graph, [small, small], algorithm=algorithm)
        assert not sol.evaluation.fits
        assert len(sol.bounds) == 3


@pytest.mark.parametrize("algorithm", ["uniform", "params", "time"])
def test_baselines_give_non_empty_stages(algorithm: str) -> None:
    rng = np.random.default_rng(2)
    for _ in range(50):
        n, k = int(rng.integers(1, 40)), int(rng.integers(1, 9))
        if k > n:
            continue
        compute = list(rng.choice([0.0, 1.0, 5.0, 100.0], n))
        bounds = getattr(baselines, algorithm)(_problem(compute, list(compute), k))
        assert bounds[0] == 0 and bounds[-1] == n and len(bounds) == k + 1
        assert all(a < b for a, b in itertools.pairwise(bounds))
