"""What a plan predicts: the simulated step against closed forms, and repricing on other devices."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.fx

from partition import plan_model
from partition.devices import Device, parse_devices
from partition.errors import PlanError
from partition.models.examples import skipnet
from partition.plan import Plan, StagePlan
from partition.planning.predict import predict_step, reprice, simulate_plan

UNIT = Device(name="u", memory=10**9, flops=1.0, bandwidth=1.0, latency=0.0)


def _stage(s: int, forward: float = 1.0, total: float = 3.0, send: float = 0.0) -> StagePlan:
    """A stage of ``forward`` s forward and ``total`` s forward + backward on a 1 FLOP/s device."""
    return StagePlan(
        index=s,
        device=UNIT,
        start=s,
        stop=s + 1,
        first_node=f"n{s}",
        last_node=f"n{s}",
        first_module="",
        last_module="",
        flops=total,
        forward_flops=forward,
        param_bytes=0,
        memory={"total": 0.0},
        capacity=UNIT.memory,
        compute_time=total,
        comm_time=0.0,
        send_bytes=send,
    )


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize(("p", "m"), [(1, 1), (2, 4), (4, 8), (3, 2)])
def test_uniform_stages_take_m_plus_p_minus_1_slots(schedule: str, p: int, m: int) -> None:
    # F = 1 s, B = 2 s on every stage, no communication: a step is m + p - 1 slots of F + B,
    # and the bubble is the idle share (p - 1) / (m + p - 1)
    step, bubble = predict_step(schedule, 1, m, [_stage(s) for s in range(p)])
    assert step == pytest.approx((m + p - 1) * 3.0)
    assert bubble == pytest.approx((p - 1) / (m + p - 1))


def test_the_slowest_stage_sets_the_steady_state() -> None:
    # GPipe, one stage twice as slow: the m forwards queue behind it, then the backwards
    stages = [_stage(0), _stage(1, forward=2.0, total=6.0), _stage(2)]
    step, _ = predict_step("gpipe", 1, 4, stages)
    # forwards: 1 + 4 * 2 + 1, backwards: 2 + 4 * 4 + 2 (each a chain through the slow stage)
    assert step == pytest.approx((1 + 4 * 2 + 1) + (2 + 4 * 4 + 2))


def test_sending_costs_time() -> None:
    quiet = [_stage(s) for s in range(3)]
    loud = [_stage(s, send=0.5 if s < 2 else 0.0) for s in range(3)]
    for schedule in ("gpipe", "1f1b", "zb-h1"):
        assert predict_step(schedule, 1, 4, loud)[0] > predict_step(schedule, 1, 4, quiet)[0]


def test_a_schedule_that_cannot_run_the_plan_says_how_to_re_plan() -> None:
    with pytest.raises(PlanError, match="re-plan with --schedule interleaved --virtual V"):
        predict_step("1f1b", 2, 4, [_stage(s) for s in range(4)])
    with pytest.raises(PlanError, match="1 stage"):
        predict_step("interleaved", 1, 4, [_stage(s) for s in range(2)])


def _plan() -> Plan:
    model, inputs, _ = skipnet(batch=8)
    return plan_model(model, inputs, devices=parse_devices("cpu", 3), microbatches=4)


def test_simulating_a_plan_gives_its_prediction_and_takes_overrides() -> None:
    plan = _plan()
    result = simulate_plan(plan)
    assert result.step_time == plan.step_time and result.bubble_fraction == plan.bubble
    more = simulate_plan(plan, microbatches=8)
    assert more.step_time > plan.step_time and more.bubble_fraction < plan.bubble
    assert simulate_plan(plan, schedule="gpipe").step_time > 0


def test_repricing_on_faster_devices_divides_compute_times() -> None:
    plan = _plan()
    cpu = parse_devices("cpu", 3)
    fast = [replace(d, flops=d.flops * 4) for d in cpu]
    again = reprice(plan, fast)
    assert [s.compute_time for s in again.stages] == pytest.approx(
        [s.compute_time / 4 for s in plan.stages], rel=1e-12
    )
    assert [s.comm_time for s in again.stages] == pytest.approx([s.comm_time for s in plan.stages])
    assert [s.memory for s in again.stages] == [s.memory for s in plan.stages]
    assert again.bounds == plan.bounds and again.step_time < plan.step_time
    bigger = reprice(plan, [replace(d, memory=d.memory * 2) for d in cpu])
    assert [s.capacity for s in bigger.stages] == [2 * s.capacity for s in plan.stages]
    with pytest.raises(PlanError, match="the plan has 3 ranks but 2 devices were given"):
        reprice(plan, cpu[:2])


CALIBRATED = {"dispatch_forward": 3e-6, "dispatch_backward": 9e-6, "action_overhead": 15e-6}


def test_fixed_costs_add_to_every_action_by_hand() -> None:
    # One stage of skipnet on one cpu: 1F1B runs m forwards and m backwards back to back, so
    # the step is m times the stage time, and calibrating adds m (ops x (3 + 9) us + 15 us).
    model, inputs, _ = skipnet(batch=8)
    plain = plan_model(model, inputs, devices=parse_devices("cpu", 1), microbatches=4)
    stage = plain.stages[0]
    ops = _ops(model)
    assert stage.dispatched == ops > 0
    calibrated = reprice(plain, [replace(plain.stages[0].device, **CALIBRATED)])
    extra = ops * 12e-6 + 15e-6
    assert calibrated.stages[0].compute_time == pytest.approx(stage.compute_time + extra)
    assert calibrated.step_time == pytest.approx(plain.step_time + 4 * extra, rel=1e-12)
    again = plan_model(model, inputs, devices=[replace(stage.device, **CALIBRATED)], microbatches=4)
    assert again.step_time == pytest.approx(calibrated.step_time, rel=1e-12)


def _ops(model: torch.nn.Module) -> int:
    """The nodes of ``model``'s FX graph that run an operation, counted apart from pipepart."""
    nodes = torch.fx.symbolic_trace(model).graph.nodes
    return sum(n.op in ("call_function", "call_module", "call_method") for n in nodes)


def test_the_forward_takes_its_ops_and_half_the_action_overhead() -> None:
    # p = 2, m = 4, every stage 5 ops: F = 1 + 5 fwd + action / 2, B = 2 + 5 bwd + action / 2
    device = replace(UNIT, dispatch_forward=0.25, dispatch_backward=0.5, action_overhead=1.0)
    stages = [
        replace(_stage(s, total=3.0 + 5 * 0.75 + 1.0), device=device, dispatched=5.0)
        for s in range(2)
    ]
    step, _ = predict_step("1f1b", 1, 4, stages)
    assert step == pytest.approx((4 + 2 - 1) * (3.0 + 5 * 0.75 + 1.0))
    gpipe, _ = predict_step("gpipe", 1, 1, stages)  # F0, F1, B1, B0
    assert gpipe == pytest.approx(2 * (1 + 5 * 0.25 + 0.5) + 2 * (2 + 5 * 0.5 + 0.5))


def test_a_plan_file_without_op_counts_counts_every_node() -> None:
    data = _plan().stages[1].to_dict()
    del data["dispatched"]
    old = StagePlan.from_dict(data)
    assert old.dispatched == old.stop - old.start


def test_repricing_on_the_same_devices_keeps_every_stage_s_memory_buffers_included() -> None:
    """A BatchNorm's running statistics are weights without gradients or optimizer state:
    `reprice` reads them back from the plan's stages (what their weights hold beyond their
    parameters), so the same split on the same devices costs what the plan says."""
    with torch.device("meta"):
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 4, 3),
        )
    plan = plan_model(
        model, (torch.empty(8, 3, 16, 16, device="meta"),), devices=parse_devices("cpu", 2)
    )
    assert any(s.memory["weights"] > s.param_bytes for s in plan.stages)  # a stage holds buffers
    again = reprice(plan, [s.device for s in plan.stages])
    for before, after in zip(plan.stages, again.stages, strict=True):
        assert after.memory == pytest.approx(before.memory)


def test_each_message_costs_both_ranks_and_each_step_its_fixed_cost_and_update_by_hand() -> None:
    # [Note: a step's fixed costs]. GPipe, 2 stages, 1 micro-batch, F = 1 s, B = 2 s, one byte
    # over a 1 B/s link: F0, 1 s on the link, F1, B1, 1 s back, B0 = 8 s. A message costs each
    # rank 0.25 s: stage 0's F sends and its B receives, stage 1's F receives and its B sends
    # (+ 4 x 0.25 s on the path). Then the step: 0.5 s fixed and the slowest rank's update,
    # 30 B at 10 B/s.
    device = replace(UNIT, message_overhead=0.25, step_overhead=0.5, update_rate=10.0)
    stages = [
        replace(_stage(0, send=1.0), device=device, param_bytes=10),
        replace(_stage(1), device=device, param_bytes=30),
    ]
    step, _ = predict_step("gpipe", 1, 1, stages)
    assert step == pytest.approx(8.0 + 4 * 0.25 + 0.5 + 30 / 10.0)
    assert predict_step("gpipe", 1, 1, [replace(s, device=UNIT) for s in stages])[0] == 8.0
    # No bytes over the cut (nothing crosses it), no message: only the step's costs remain.
    quiet = [replace(stages[0], send_bytes=0.0), stages[1]]
    assert predict_step("gpipe", 1, 1, quiet)[0] == pytest.approx(6.0 + 0.5 + 3.0)


def test_a_step_s_fixed_costs_follow_the_slowest_rank_and_the_simulator_leaves_them_out() -> None:
    # Interleaved over 2 ranks: rank 0 holds stages 0 and 2 (10 + 5 B), rank 1 stages 1 and 3
    # (1 + 1 B); at 1 B/s the step adds 15 s, and the schedule alone is what simulate says.
    device = replace(UNIT, update_rate=1.0)
    sizes = [10, 1, 5, 1]
    stages = [replace(_stage(s), device=device, param_bytes=b) for s, b in enumerate(sizes)]
    step, _ = predict_step("interleaved", 2, 4, stages)
    plain, _ = predict_step("interleaved", 2, 4, [replace(s, device=UNIT) for s in stages])
    assert step == pytest.approx(plain + 15.0)
