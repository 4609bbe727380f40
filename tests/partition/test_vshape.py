"""The V placement and the V-shaped schedules (ZB-V, DualPipeV) as data: placed, validated,
simulated against their published bubbles, counted, planned, and written in a file.

See [Note: placement] in `partition.schedules.placement` and [Note: DualPipeV's overlapped
pair] in `partition.schedules.vshape`.
"""

from __future__ import annotations

import itertools

import pytest

from partition.devices import Device
from partition.errors import PlanError
from partition.options import PlanOptions
from partition.schedules.actions import (
    Kind,
    Schedule,
    build_schedule,
    peak_inflight,
    with_communication,
)
from partition.schedules.check import check_channel_order, validate
from partition.schedules.communication import overlap_pairs
from partition.schedules.custom import custom_virtual, schedule_for
from partition.schedules.inflight import schedule_inflight
from partition.schedules.names import (
    V_SCHEDULES,
    canonical_schedule,
    placement_of,
    schedule_label,
    stages_per_rank,
)
from partition.schedules.placement import rank_stages, read_placement, stage_rank
from partition.schedules.simulate import SimResult, simulate

COMPUTE = (Kind.F, Kind.B, Kind.I, Kind.W)


# --- placement -------------------------------------------------------------------------------


def test_the_v_placement_folds_the_stages_back_over_the_ranks() -> None:
    assert [stage_rank(s, 4, "v") for s in range(8)] == [0, 1, 2, 3, 3, 2, 1, 0]
    assert [stage_rank(s, 4) for s in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    for p in range(1, 7):
        for r in range(p):
            assert rank_stages(r, p, 2 * p, "v") == (r, 2 * p - 1 - r)
            assert all(stage_rank(s, p, "v") == r for s in rank_stages(r, p, 2 * p, "v"))


@pytest.mark.parametrize("name", V_SCHEDULES)
def test_a_v_schedule_places_two_stages_on_each_rank(name: str) -> None:
    schedule = build_schedule(name, 3, 6)
    assert (schedule.placement, schedule.num_stages) == ("v", 6)
    assert [schedule.stages_of(r) for r in range(3)] == [(0, 5), (1, 4), (2, 3)]
    for r, row in enumerate(schedule.actions):
        assert {a.stage for a in row} == set(schedule.stages_of(r))
    assert build_schedule(name, 3, 6, virtual=2) == schedule  # virtual 1 (default) or 2


def test_a_v_schedule_needs_two_stages_per_rank() -> None:
    with pytest.raises(PlanError, match="2 stages on each rank, but 3 stages are on 3 ranks"):
        Schedule("x", 3, 3, 1, ((), (), ()), placement="v")
    with pytest.raises(PlanError, match="unknown placement 'zigzag'"):
        Schedule("x", 1, 1, 1, ((),), placement="zigzag")  # type: ignore[arg-type]
    with pytest.raises(PlanError, match=r"exactly 2 stages per rank.*virtual=3"):
        build_schedule("zb-v", 2, 4, virtual=3)
    with pytest.raises(PlanError, match="is V-shaped"):
        stages_per_rank("dualpipev", 4)


def test_a_stage_on_the_wrong_rank_is_pointed_at_with_the_v_rule() -> None:
    rows = build_schedule("zb-v", 2, 2).actions
    swapped = Schedule("zb-v", 2, 4, 2, (rows[1], rows[0]), placement="v")
    with pytest.raises(
        PlanError, match=r"stage 1 lives on rank 1 \(V placement: rank r holds r and 3 - r\)"
    ):
        validate(swapped)


# --- the schedules are valid -----------------------------------------------------------------


@pytest.mark.parametrize("name", V_SCHEDULES)
def test_every_small_v_schedule_is_valid(name: str) -> None:
    """p in 1..6, m in 1..24 (fewer micro-batches than stages included): every action on its
    rank, one F and one backward per (stage, micro-batch), no deadlock, links in order."""
    for p, m in itertools.product(range(1, 7), range(1, 25)):
        schedule = build_schedule(name, p, m)
        validate(schedule)
        comm = with_communication(schedule)
        validate(comm)
        check_channel_order(comm)
        validate(overlap_pairs(schedule))


@pytest.mark.parametrize("name", V_SCHEDULES)
def test_stages_of_one_rank_exchange_no_message(name: str) -> None:
    """The middle cut (stage p-1 to p, both on rank p-1) has no send or receive; every other cut
    carries one message per micro-batch each way."""
    for p, m in itertools.product(range(1, 6), (1, 3, 8)):
        comm = with_communication(build_schedule(name, p, m))
        talk = [a for row in comm.actions for a in row if a.kind not in COMPUTE]
        cut = {Kind.SEND_F: 0, Kind.RECV_F: -1, Kind.SEND_B: -1, Kind.RECV_B: 0}
        assert all(a.stage + cut[a.kind] != p - 1 for a in talk), (p, m)
        assert len(talk) == 4 * m * (2 * p - 2), (p, m)


def test_zb_v_splits_every_backward_and_dualpipev_only_its_drain() -> None:
    for p, m in itertools.product(range(1, 6), range(1, 13)):
        kinds = {a.kind for row in build_schedule("zb-v", p, m).actions for a in row}
        assert kinds == {Kind.F, Kind.I, Kind.W}
        dual = [a.kind for row in build_schedule("dualpipev", p, m).actions for a in row]
        assert dual.count(Kind.I) == dual.count(Kind.W)
        if m >= 2 * p:  # the steady state runs full backwards in its overlapped pairs
            assert dual.count(Kind.B) >= 2 * (m - 2 * p + 1)


def test_the_text_form_carries_the_placement() -> None:
    schedule = build_schedule("dualpipev", 2, 4)
    text = schedule.to_text()
    assert text.startswith("# placement: v\n0F0 0F1 ")
    back = Schedule.from_text(text, name="dualpipev")
    assert back == schedule
    assert read_placement(build_schedule("1f1b", 2, 2).to_text())[0] == "loop"


# --- the simulator gives the published bubbles ----------------------------------------------


def _idle_within(result: SimResult, p: int) -> list[float]:
    """Per rank, its idle time between its first compute and its last."""
    out = []
    for r in range(p):
        spans = [(s, e) for rank, a, s, e in result.timeline if rank == r and a.kind in COMPUTE]
        out.append(max(e for _, e in spans) - min(s for s, _ in spans) - result.busy_time[r])
    return out


def test_zb_h1_bubble_is_p_minus_1_times_f_plus_i_minus_w() -> None:
    """Qi et al.'s ZB-H1: (p - 1)(F + B - W) with their B the input-gradient half, our I."""
    for p, (f, b, w) in itertools.product(range(2, 7), [(1, 2, 1), (1.0, 2.5, 0.75)]):
        r = simulate(
            build_schedule("zb-h1", p, 3 * p), forward_time=f, backward_time=b, weight_time=w
        )
        assert r.step_time - max(r.busy_time) == pytest.approx((p - 1) * (f + (b - w) - w))


@pytest.mark.parametrize("p", range(2, 7))
def test_zb_v_has_no_bubble_when_f_i_and_w_are_equal(p: int) -> None:
    """With F = I = W (= 1) and m >= 2p - 1, no rank idles between its first action and its
    last: the step is each rank's 6m of work plus the pipeline's fill, (p - 1) F."""
    for m in (2 * p - 1, 2 * p, 3 * p + 1):
        r = simulate(build_schedule("zb-v", p, m), forward_time=1, backward_time=2, weight_time=1)
        assert _idle_within(r, p) == [0.0] * p, m
        assert r.busy_time == (6.0 * m,) * p
        assert r.step_time == 6 * m + (p - 1)
    fewer = simulate(build_schedule("zb-v", p, p), forward_time=1, backward_time=2, weight_time=1)
    assert max(_idle_within(fewer, p)) > 0  # too few micro-batches to fill the V


@pytest.mark.parametrize("p", range(2, 7))
def test_dualpipev_overlapped_pairs_give_the_published_bubble(p: int) -> None:
    """DeepSeek's DualPipe bubble, (PP/2 - 1)(F&B + B - 3W), with PP = 2p stages and F&B = F + B,
    when each pair waits for both inputs (`overlap_pairs`), wherever F <= I and W <= I; the
    schedule as built (the runtime's) waits less and is never slower: (p - 1) F at F = I = W."""
    times = [(1, 2, 1), (1, 2, 0.8), (1, 1.5, 0.5), (0.5, 3, 1.25), (2, 4, 1.5), (1.5, 3, 1.5)]
    for m, (f, b, w) in itertools.product((2 * p, 3 * p + 1), times):
        assert f <= b - w and w <= b - w
        schedule = build_schedule("dualpipev", p, m)
        paired = simulate(overlap_pairs(schedule), forward_time=f, backward_time=b, weight_time=w)
        published = (2 * p / 2 - 1) * ((f + b) + b - 3 * w)
        assert paired.step_time - max(paired.busy_time) == pytest.approx(published), (m, f, b, w)
        built = simulate(schedule, forward_time=f, backward_time=b, weight_time=w)
        assert built.step_time <= paired.step_time + 1e-9
    r = simulate(
        build_schedule("dualpipev", p, 2 * p), forward_time=1, backward_time=2, weight_time=1
    )
    assert r.step_time - max(r.busy_time) == p - 1


# --- in-flight counts ------------------------------------------------------------------------


@pytest.mark.parametrize("name", V_SCHEDULES)
def test_v_in_flight_counts_are_1f1b_over_the_2p_stages(name: str) -> None:
    """Stage s of 2p holds min(2p - s, m): rank r's two stages hold 2p + 1 micro-batches at
    m >= 2p, the half-size stages' equivalent of 1F1B's p (DualPipe's "PP + 1")."""
    for p, m in itertools.product(range(1, 9), range(1, 33)):
        held = peak_inflight(build_schedule(name, p, m))
        assert held == [min(2 * p - s, m) for s in range(2 * p)], (p, m)
        assert schedule_inflight(name, p, m, 2) == tuple(held)
        if m >= 2 * p:
            assert {held[r] + held[2 * p - 1 - r] for r in range(p)} == {2 * p + 1}


# --- names, options, the planner ----------------------------------------------------------------


def test_names_aliases_and_options() -> None:
    assert [canonical_schedule(n) for n in ("ZBV", "zero_bubble_v", "dualpipe-v")] == [
        "zb-v",
        "zb-v",
        "dualpipev",
    ]
    assert [placement_of(n) for n in ("zb-v", "dualpipev", "interleaved", "1f1b")] == [
        "v",
        "v",
        "loop",
        "loop",
    ]
    assert PlanOptions(schedule="zb-v").virtual == 2  # no --virtual needed
    assert PlanOptions(schedule="dualpipev", virtual=2).virtual == 2
    with pytest.raises(PlanError, match="leave --virtual out or pass 2"):
        PlanOptions(schedule="zb-v", virtual=3)


def test_the_planner_places_prices_and_frees_the_middle_cut() -> None:
    import numpy as np

    from partition.algorithms.problem import Problem
    from partition.graph import LinearGraph

    n = 8
    graph = LinearGraph(
        names=tuple(f"n{i}" for i in range(n)),
        module_paths=tuple(f"n{i}" for i in range(n)),
        compute=np.ones(n),
        forward=np.ones(n) / 3,
        param_bytes=np.ones(n),
        saved_bytes=np.ones(n),
        cut_bytes=np.ones(n + 1),
        param_element_size=4.0,
    )
    devices = tuple(
        Device(name=f"d{i}", memory=100 * (i + 1), flops=1.0, bandwidth=1.0, latency=0.5)
        for i in range(3)
    )
    problem = Problem(graph=graph, devices=devices, schedule="zb-v", microbatches=6, virtual=2)
    assert [problem.stage_device(s).name for s in range(6)] == ["d0", "d1", "d2", "d2", "d1", "d0"]
    assert problem.caps == (50.0, 100.0, 150.0, 150.0, 100.0, 50.0)
    assert problem.inflight == (6, 5, 4, 3, 2, 1)
    costs = problem.costs
    assert costs.remote.tolist() == [True, True, False, True, True]  # stages 2 | 3 share d2
    assert costs.link_at(2).max() == 0.0 and costs.link_at(1).max() > 0.0
    with pytest.raises(PlanError, match="use virtual=2"):
        Problem(graph=graph, devices=devices, schedule="dualpipev", microbatches=6)


# --- a schedule a user writes ----------------------------------------------------------------


def test_a_file_declares_the_v_placement(tmp_path: object) -> None:
    from pathlib import Path

    built = build_schedule("zb-v", 2, 2)
    path = Path(str(tmp_path)) / "zbv.txt"
    path.write_text(
        "# my ZB-V\n" + built.to_text().replace("# placement: v", "#placement:V") + "\n"
    )
    text = canonical_schedule(f"@{path}")
    assert text.splitlines()[0] == "# placement: v"  # the one comment kept
    assert placement_of(text) == "v" and custom_virtual(text) == 2
    assert schedule_label(text) == "custom (2 ranks)"
    got = schedule_for(text, 2, 2, 2)
    assert (got.placement, got.actions) == ("v", built.actions)
    assert PlanOptions(schedule=f"@{path}").virtual == 2
    loop = text.replace("# placement: v\n", "")  # the same lines, looping: stage 3 is rank 1's
    with pytest.raises(PlanError, match=r"stage 3 lives on rank 1 \(s % 2\)"):
        schedule_for(loop, 2, 2, 2)
    with pytest.raises(PlanError, match="placement 'w'"):
        canonical_schedule("# placement: w\n0F0 0B0")
