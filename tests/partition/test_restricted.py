"""Solving on allowed cuts only (`partition.planning.restricted`): the optimum over those cuts.

A model with two modes may be cut only where both modes agree; the partitioner then solves a
coarser graph. These check, against an exhaustive search over the allowed cuts, that the split
found is the best of them and that its evaluation is the fine graph's.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from partition.devices import Device
from partition.errors import InfeasibleError
from partition.graph import LinearGraph
from partition.options import PlanOptions
from partition.planning.restricted import coarsen, solve_on_cuts
from partition.solve import Problem, evaluate


def _graph(seed: int, n: int = 10) -> LinearGraph:
    rng = np.random.default_rng(seed)
    return LinearGraph.from_arrays(
        compute=rng.uniform(1e9, 5e9, n),
        param_bytes=rng.uniform(0, 4e6, n),
        saved_bytes=rng.uniform(0, 2e6, n),
        cut_bytes=rng.uniform(1e5, 1e6, n - 1),
        names=tuple(f"n{i}" for i in range(n)),
    )


def _devices(count: int, memory: int = 10**9) -> list[Device]:
    return [
        Device(name=f"d{i}", memory=memory, flops=1e12 * (1 + i % 2), bandwidth=1e9, latency=1e-5)
        for i in range(count)
    ]


@pytest.mark.parametrize("seed", range(6))
def test_the_split_is_the_best_over_the_allowed_cuts(seed: int) -> None:
    graph = _graph(seed)
    n = len(graph)
    rng = np.random.default_rng(100 + seed)
    cuts = sorted(int(c) for c in rng.choice(np.arange(1, n), size=5, replace=False))
    devices = _devices(3)
    options = PlanOptions(microbatches=4)
    found = solve_on_cuts(graph, cuts, devices, options, "a test")
    assert set(found.bounds[1:-1]) <= set(cuts)
    problem = Problem(graph=graph, devices=tuple(devices), schedule="1f1b", microbatches=4)
    best = min(
        evaluate(problem, (0, *chosen, n)).bottleneck
        for chosen in itertools.combinations(cuts, 2)
        if evaluate(problem, (0, *chosen, n)).fits
    )
    assert found.evaluation.bottleneck == pytest.approx(best, rel=1e-9)
    assert found.evaluation == evaluate(problem, found.bounds)  # priced on the fine graph
    assert found.problem.graph is graph


def test_coarsening_sums_every_node_cost_and_keeps_the_cut_widths() -> None:
    graph = _graph(0, n=6)
    coarse = coarsen(graph, [2, 5])
    assert coarse.names == ("n0…n1", "n2…n4", "n5")
    assert np.allclose(
        coarse.compute, [graph.compute[:2].sum(), graph.compute[2:5].sum(), graph.compute[5]]
    )
    assert np.allclose(coarse.saved_bytes[1], graph.saved_bytes[2:5].sum())
    assert np.array_equal(coarse.cut_bytes, graph.cut_bytes[[0, 2, 5, 6]])


def test_too_few_allowed_cuts_say_how_many_devices_can_be_used() -> None:
    graph = _graph(1)
    with pytest.raises(InfeasibleError) as info:
        solve_on_cuts(graph, [4], _devices(3), PlanOptions(microbatches=4), "the modes differ")
    message = str(info.value)
    assert "3 stages need 2 cuts, but only 1 of the 9 cut positions can be used" in message
    assert "the modes differ" in message and "Use at most 2 devices" in message
