"""Recomputation priced ([Note: recompute] in `partition.memory`): a stage keeps its input per
micro-batch in flight and one micro-batch's activations, and its backward runs the forward
again; the partitioner stays exact under it."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings

from partition.algorithms.objective import evaluate
from partition.algorithms.problem import Problem
from partition.devices import Device
from partition.errors import InfeasibleError
from partition.graph import LinearGraph
from partition.memory import MemoryModel
from partition.solve import min_devices, solve
from tests.partition.test_solve import problems
from tests.partition.test_step import _check

# The graph of test_objective: cuts 1 and 2 carry 5 and 7 bytes; forward = compute / 3.
GRAPH = LinearGraph.from_arrays([3.0, 6.0, 9.0], [10.0, 20.0, 30.0], [1.0, 2.0, 3.0], [5.0, 7.0])
D0 = Device(name="d0", memory=1000, flops=1.0, bandwidth=10.0, latency=0.5)


def test_a_split_under_recompute_worked_by_hand() -> None:
    plain = Problem(graph=GRAPH, devices=(D0, D0), schedule="1f1b", microbatches=4)
    again = replace(plain, memory=MemoryModel(recompute=True))
    e, r = evaluate(plain, [0, 2, 3]), evaluate(again, [0, 2, 3])
    # time: the forward (a third of the compute) runs twice
    assert e.stage_compute_times == pytest.approx((9.0, 9.0))
    assert r.stage_compute_times == pytest.approx((9.0 + 3.0, 9.0 + 3.0))
    # 1F1B on 2 stages holds 2 and 1 micro-batches. Plain: 2 * (1 + 2) and 1 * 3 of activations.
    # Recompute: one micro-batch's (3 and 3), plus the input per micro-batch in flight: stage 0's
    # input is the data (cut 0, no bytes), stage 1's is cut 2 (7 bytes) once.
    assert e.stage_memory_parts[0]["activations"] == 6.0
    assert e.stage_memory_parts[1]["activations"] == 3.0
    assert r.stage_memory_parts[0]["activations"] == 3.0
    assert r.stage_memory_parts[1]["activations"] == 3.0 + 7.0
    assert r.stage_memory_parts[1]["buffers"] == e.stage_memory_parts[1]["buffers"] == 7.0


def test_recompute_fits_where_activations_do_not() -> None:
    # 8 nodes of heavy activations: GPipe with 8 micro-batches holds all 8 of them, too many
    # for 2 devices; recomputing holds one and the inputs, and fits.
    graph = LinearGraph.from_arrays([1.0] * 8, [1.0] * 8, [100.0] * 8, [1.0] * 7)
    devices = (Device(name="d", memory=1200, flops=1.0),) * 2
    with pytest.raises(InfeasibleError):
        solve(graph, devices, schedule="gpipe", microbatches=8)
    sol = solve(
        graph, devices, schedule="gpipe", microbatches=8, memory=MemoryModel(recompute=True)
    )
    assert sol.evaluation.fits
    problem = Problem(graph=graph, devices=devices, schedule="gpipe", microbatches=8)
    assert min_devices(problem) is not None and min_devices(problem) > 2  # type: ignore[operator]
    assert min_devices(replace(problem, memory=MemoryModel(recompute=True))) == 1


@settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(problems())
def test_partitioner_under_recompute_equals_brute_force(problem: Problem) -> None:
    _check(replace(problem, memory=replace(problem.memory, recompute=True)))
