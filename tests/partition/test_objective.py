"""The objective of a split, against numbers worked by hand from [Note: objective]."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from partition.algorithms.objective import check_bounds, evaluate
from partition.algorithms.problem import Problem
from partition.devices import Device
from partition.errors import PlanError
from partition.graph import LinearGraph

# Three nodes; cuts 1 and 2 carry 5 and 7 bytes. Device 0 is twice as fast as device 1 and has
# the faster link. Adam at 4 bytes per element: kappa = 1 + 1 + 2 = 4.
GRAPH = LinearGraph.from_arrays([2.0, 4.0, 6.0], [10.0, 20.0, 30.0], [1.0, 2.0, 3.0], [5.0, 7.0])
D0 = Device(name="d0", memory=1000, flops=2.0, bandwidth=10.0, latency=0.5)
D1 = Device(name="d1", memory=1000, flops=1.0, bandwidth=5.0, latency=1.0)
PROBLEM = Problem(graph=GRAPH, devices=(D0, D1), schedule="1f1b", microbatches=4)


def test_every_term_of_a_split_worked_by_hand() -> None:
    e = evaluate(PROBLEM, [0, 2, 3])
    # stage 0: (2 + 4) / 2 = 3 s of compute, then cut 2 (7 B) over d0's link: 2 (0.5 + 7/10)
    # stage 1: 6 / 1 = 6 s, and the same link in
    link = 2 * (0.5 + 7 / 10)
    assert e.stage_compute_times == pytest.approx((3.0, 6.0))
    assert e.stage_comm_times == pytest.approx((link, link))
    assert e.stage_times == pytest.approx((3.0 + link, 6.0 + link))
    assert e.bottleneck == pytest.approx(6.0 + link) and e.total_time == pytest.approx(9 + 2 * link)
    # 1F1B on 2 stages, 4 micro-batches: stage 0 holds 2, stage 1 holds 1
    assert e.stage_inflight == (2, 1)
    # stage 0: 4 * 30 (weights, gradients, Adam) + 2 * (1 + 2) + (0 + 7) = 133
    # stage 1: 4 * 30 + 1 * 3 + (7 + 0) = 130
    assert e.stage_memory == (133.0, 130.0)
    assert e.stage_memory_parts[0] == {
        "weights": 30.0,
        "gradients": 30.0,
        "optimizer": 60.0,
        "activations": 6.0,
        "buffers": 7.0,
    }
    assert e.comm_bytes == 7.0 and e.peak_memory == pytest.approx(0.133)
    assert e.perfect_balance == pytest.approx(12 / 3)  # all compute over all FLOP/s
    assert e.balance_ratio == pytest.approx((6.0 + link) / 4)
    assert e.fits and e.within_shares
    assert e.device_memory == (133.0, 130.0) and e.device_caps == (1000.0, 1000.0)
    assert e.idle_stages == 0  # every stage computes
    assert e.key == (e.bottleneck, 0, e.total_time, e.comm_bytes, e.peak_memory)


def test_a_share_can_overflow_while_the_device_fits() -> None:
    # Interleaved, one device of 100 B, two chunks of 50 B each: 60 + 30 fits the device, not
    # the shares the partitioner enforces.
    graph = LinearGraph.from_arrays([1.0, 1.0], [15.0, 7.5], [0.0, 0.0], [0.0])
    device = Device(name="d", memory=100, flops=1.0)
    problem = Problem(
        graph=graph, devices=(device,), schedule="interleaved", microbatches=2, virtual=2
    )
    e = evaluate(problem, [0, 1, 2])
    assert e.caps == (50.0, 50.0) and e.stage_memory == (60.0, 30.0)
    assert e.device_memory == (90.0,) and e.fits and not e.within_shares
    assert e.peak_memory == pytest.approx(60 / 50)


def test_total_time_in_units_ties_exactly_where_the_sums_differ_in_float() -> None:
    # Identical devices, no cut widths: every split does the same work, so every split ties on
    # S. Summed in float the totals differ in the last bits; in units they are equal.
    compute = [0.1, 0.7, 0.2, 0.3, 1e-3, 0.9]
    graph = LinearGraph.from_arrays(compute, [0.0] * 6, [0.0] * 6, [0.0] * 5)
    device = Device(name="d", memory=10, flops=3.0)
    problem = Problem(graph=graph, devices=(device,) * 3, schedule="1f1b", microbatches=3)
    costs = problem.costs
    splits = [(0, *cuts, 6) for cuts in itertools.combinations(range(1, 6), 2)]
    floats = {sum(sum(compute[i:j]) / 3.0 for i, j in itertools.pairwise(b)) for b in splits}
    assert len(floats) > 1  # the float sums do not all agree
    units = {costs.split_units(b) for b in splits}
    assert len(units) == 1
    # and a unit is fine enough: the units give S to within 2 k units
    (u,) = units
    assert abs(u * costs.unit - sum(compute) / 3.0) <= 2 * 3 * costs.unit
    assert float(u).is_integer()


def test_units_order_splits_whose_total_times_differ() -> None:
    costs = PROBLEM.costs
    for a, b in itertools.permutations([(0, 1, 3), (0, 2, 3)], 2):
        ta, tb = evaluate(PROBLEM, a).total_time, evaluate(PROBLEM, b).total_time
        assert (costs.split_units(a) < costs.split_units(b)) == (ta < tb)


def test_split_times_equal_stage_by_stage_times() -> None:
    costs = PROBLEM.costs
    for bounds in [(0, 1, 3), (0, 2, 3)]:
        one = [float(costs.time(s, bounds[s], bounds[s + 1])) for s in range(2)]
        assert costs.split_times(bounds).tolist() == one
    i, j = np.array([0, 0, 1]), np.array([1, 2, 3])
    assert costs.memory(0, i, j).tolist() == [
        float(costs.memory(0, int(x), int(y))) for x, y in zip(i, j, strict=True)
    ]


@pytest.mark.parametrize(
    ("bounds", "message"),
    [
        ([0, 3], "a split into 2 stages needs 3 bounds, got 2"),
        ([1, 2, 3], "bounds must start at 0 and end at 3"),
        ([0, 3, 3], r"stage 1 is empty or reversed: bounds\[1:3\] = \(3, 3\)"),
    ],
)
def test_bad_bounds_say_what_is_wrong(bounds: list[int], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        evaluate(PROBLEM, bounds)
    with pytest.raises(PlanError, match=message):
        check_bounds(PROBLEM, bounds)
