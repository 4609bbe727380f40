"""`pipeline.calibrate.compute`: throughputs and fixed costs measured on this CPU."""

from __future__ import annotations

import torch

from pipeline.calibrate.compute import dispatch_costs, elementwise_rate, matmul_rates, median_time


def test_matmul_and_elementwise_rates_are_plausible_for_a_cpu() -> None:
    rates = matmul_rates(torch.device("cpu"), (64, 128))
    assert set(rates) == {64, 128}
    assert all(1e7 < r < 1e13 for r in rates.values())  # 10 MFLOP/s to 10 TFLOP/s
    assert 1e7 < elementwise_rate(torch.device("cpu"), 2**16) < 1e13


def test_fixed_costs_scale_with_nodes_not_size() -> None:
    costs = dispatch_costs(torch.device("cpu"), length=50)
    assert 1e-8 < costs.forward < 1e-3  # 10 ns to 1 ms per node
    assert 1e-8 < costs.backward < 1e-3
    assert costs.action >= 0.0


def test_median_time_repeats_at_least_five_times() -> None:
    calls: list[int] = []
    median_time(lambda: calls.append(1), torch.device("cpu"), budget=0.0)
    assert len(calls) == 6  # one warm-up, five timed
