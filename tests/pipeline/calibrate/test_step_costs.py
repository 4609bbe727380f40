"""`pipeline.calibrate.step` and `pipeline.calibrate.link`: what a step and a message cost,
measured on this CPU (plausible ranges only: the machine is shared)."""

from __future__ import annotations

import pytest
import torch

from pipeline.calibrate.link import measure_link
from pipeline.calibrate.step import step_costs


def test_an_optimizer_step_streams_bytes_and_every_step_pays_a_fixed_cost() -> None:
    costs = step_costs(torch.device("cpu"))
    assert 1e7 < costs.update_rate < 1e13  # 10 MB/s to 10 TB/s of parameters
    assert costs.clear > 0 and costs.check > 0 and costs.update_fixed >= 0
    assert costs.fixed == costs.update_fixed + costs.clear + costs.check
    assert costs.fixed < 0.1


@pytest.mark.slow
def test_a_message_s_one_way_time_is_the_link_s_latency_and_both_ranks_costs() -> None:
    link = measure_link(repeats=5)
    assert link.backend == "gloo" and link.bandwidth > 1e6
    assert 0 < link.message <= link.one_way / 2 < 0.1
    assert link.latency == pytest.approx(link.one_way - 2 * link.message)
    assert 0 < link.allreduce < 0.1
