"""`pipeline.calibrate.compute`: throughputs and fixed costs measured on this CPU."""

from __future__ import annotations

import torch

from pipeline.calibrate.compute import dispatch_costs, elementwise_rate, matmul_rates, median_time


def test_matmul_and_elementwise_rates_are_plausible_for_a_cpu() -> None:
    rates = matmul_rates(torch.device("cpu"), (64, 128))
    assert set(rates) == {64, 128}
    assert all(1e7 < r < 1e13 for r in rates.values())  # 10 MFLOP/s to 10 TFLOP/s
    assert 1e7 < elementwise_rate(torch.device("cpu"), 2**16) < 1e13


def test_fixed_costs_are_per_operation_of_a_transformer_s_mix() -> None:
    costs = dispatch_costs(torch.device("cpu"), blocks=(1, 2))
    assert 1e-7 < costs.forward < 1e-3  # 100 ns to 1 ms per operation
    assert 1e-7 < costs.backward < 1e-3
    assert costs.action >= 0.0


def test_median_time_repeats_at_least_five_times() -> None:
    calls: list[int] = []
    median_time(lambda: calls.append(1), torch.device("cpu"), budget=0.0)
    assert len(calls) == 6  # one warm-up, five timed
