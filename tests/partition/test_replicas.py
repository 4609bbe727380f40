"""The predicted time of the gradient reduction over replicas (issue 19): the ring all-reduce's
closed form per bucket, and the part the remaining backward does not hide, on the simulated
timeline of the plan's schedule."""

from __future__ import annotations

from dataclasses import replace

import pytest

from partition import plan_model
from partition.devices import Device, parse_devices
from partition.errors import PlanError
from partition.models.examples import skipnet
from partition.plan import Plan, StagePlan
from partition.planning.predict import simulate_plan
from partition.planning.replicas import (
    BUCKET_BYTES,
    bucket_sizes,
    predict_reduction,
    ring_allreduce_time,
)

LINK = Device(name="u", memory=10**9, flops=1.0, bandwidth=1.0, latency=0.0)


def _stage(s: int, param_bytes: int) -> StagePlan:
    """F 1 s, B 2 s on a 1 FLOP/s device whose link moves 1 byte/s."""
    return StagePlan(
        index=s,
        device=LINK,
        start=s,
        stop=s + 1,
        first_node=f"n{s}",
        last_node=f"n{s}",
        first_module="",
        last_module="",
        flops=3.0,
        forward_flops=1.0,
        param_bytes=param_bytes,
        memory={"total": 0.0},
        capacity=LINK.memory,
        compute_time=3.0,
        comm_time=0.0,
        send_bytes=0.0,
    )


def _plan(schedule: str, params: list[int], microbatches: int = 2, virtual: int = 1) -> Plan:
    model, inputs, _ = skipnet(batch=8)
    base = plan_model(model, inputs, devices=parse_devices("cpu", 1), microbatches=4)
    stages = tuple(_stage(s, b) for s, b in enumerate(params))
    model_info = replace(base.model, num_nodes=len(params))
    return replace(
        base,
        model=model_info,
        schedule=schedule,
        microbatches=microbatches,
        virtual=virtual,
        stages=stages,
    )


def test_a_ring_all_reduce_moves_2_d_minus_1_over_d_of_the_bytes() -> None:
    # 100 MB over 4 ranks at 10 GB/s with 50 us per message: 2·3/4 · 10 ms + 6 · 50 us
    assert ring_allreduce_time(100e6, 4, 10e9, 50e-6) == pytest.approx(0.015 + 0.0003)
    assert ring_allreduce_time(100e6, 1, 10e9, 50e-6) == 0.0  # one replica: nothing to reduce
    assert bucket_sizes(60 * 2**20) == [BUCKET_BYTES, BUCKET_BYTES, 10 * 2**20]
    assert bucket_sizes(0) == []


def test_gpipe_hides_the_last_stages_reduction_and_exposes_the_first_stages() -> None:
    # GPipe, 2 stages, 2 micro-batches: rank 1's backwards end at 7 s, rank 0's at 9 s (the
    # step). Each stage's 2 bytes take 2·1/2 · 2 / 1 = 2 s to all-reduce over 2 replicas:
    # stage 1's (7..9) hides behind stage 0's backward, stage 0's (9..11) is exposed.
    plan = _plan("gpipe", [2, 2])
    got = predict_reduction(plan, 2)
    assert got.schedule_time == pytest.approx(9.0)
    assert got.stage_time == pytest.approx((2.0, 2.0))
    assert got.finish == pytest.approx((11.0, 9.0))
    assert got.exposed == pytest.approx(2.0)
    assert predict_reduction(plan, 1).exposed == 0.0
    # 4 replicas: 2·3/4 · 2 = 3 s each; stage 1's now ends after the step too (7 + 3 = 10)
    assert predict_reduction(plan, 4).finish == pytest.approx((12.0, 10.0))


def test_an_interleaved_rank_reduces_its_later_stage_while_the_earlier_one_computes() -> None:
    # interleaved 1F1B, 2 ranks × 2 stages: rank 0 holds stages 0 and 2. Stage 2's backwards end
    # before stage 0's, so reducing it as soon as it is ready hides it; after the whole schedule
    # ("end") nothing is hidden on rank 0.
    plan = _plan("interleaved", [0, 0, 4, 0], microbatches=4, virtual=2)
    timeline = simulate_plan(plan).timeline
    last = {
        s: max(e for _, a, _, e in timeline if a.stage == s and a.kind.name in ("B", "W"))
        for s in range(4)
    }
    ends = [max(e for r, _, _, e in timeline if r == rank) for rank in range(2)]
    assert last[2] < last[0] == ends[0]
    stage = predict_reduction(plan, 2, when="stage")
    end = predict_reduction(plan, 2, when="end")
    assert stage.stage_time[2] == pytest.approx(4.0)
    assert stage.finish[0] == pytest.approx(max(last[2] + 4.0, 0.0))
    assert end.finish[0] == pytest.approx(ends[0] + 4.0)
    assert end.exposed == pytest.approx(ends[0] + 4.0 - end.schedule_time)
    assert stage.exposed < end.exposed


def test_bad_replicas_are_refused() -> None:
    plan = _plan("gpipe", [2, 2])
    with pytest.raises(PlanError, match="dp must be at least 1"):
        predict_reduction(plan, 0)
    with pytest.raises(PlanError, match="when must be one of 'stage', 'end'"):
        predict_reduction(plan, 2, when="soon")  # type: ignore[arg-type]
