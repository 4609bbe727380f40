"""The simulator against closed forms, hand-computed cases, and its own comm-explicit run."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from partition.errors import PlanError
from partition.schedules.actions import (
    SCHEDULES,
    Kind,
    Schedule,
    build_schedule,
    gpipe,
    interleaved_1f1b,
    one_f_one_b,
    peak_inflight,
    with_communication,
    zero_bubble_h1,
)
from partition.schedules.simulate import SimResult, simulate

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True)
TIMES = st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0])  # exact in binary: sums stay exact


# --- closed forms, equal stages, no communication ---------------------------------------------


@SETTINGS
@given(st.sampled_from(["gpipe", "1f1b"]), st.integers(1, 8), st.integers(1, 32), TIMES, TIMES)
def test_gpipe_and_1f1b_bubble_is_p_minus_1_over_m_plus_p_minus_1(
    name: str, p: int, m: int, f: float, b: float
) -> None:
    result = simulate(build_schedule(name, p, m), forward_time=f, backward_time=b)
    assert result.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)
    assert result.step_time == pytest.approx((m + p - 1) * (f + b), abs=1e-12)
    assert result.busy_time == pytest.approx([m * (f + b)] * p, abs=1e-12)


@SETTINGS
@given(st.integers(1, 8), st.integers(1, 4), st.integers(1, 4), TIMES, TIMES)
def test_interleaved_bubble_shrinks_by_v(p: int, groups: int, v: int, f: float, b: float) -> None:
    m = p * groups
    result = simulate(interleaved_1f1b(p, m, v), forward_time=f / v, backward_time=b / v)
    assert result.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1), abs=1e-12)


@SETTINGS
@given(st.integers(1, 8), st.integers(0, 24), TIMES, TIMES, TIMES)
def test_zero_bubble_h1_matches_the_paper_and_beats_1f1b(
    p: int, extra: int, f: float, i: float, w: float
) -> None:
    m = p + extra
    times = {"forward_time": f, "backward_time": i + w, "weight_time": w}
    zb, base = simulate(zero_bubble_h1(p, m), **times), simulate(one_f_one_b(p, m), **times)
    if w <= min(f, i):  # the paper's setting: bubble (p - 1)(F + I - W) instead of (p - 1)(F + B)
        assert zb.step_time == pytest.approx(m * (f + i + w) + (p - 1) * (f + i - w), abs=1e-12)
    assert zb.bubble_fraction <= base.bubble_fraction + 1e-12
    if p > 1 and w > 0:
        assert zb.bubble_fraction < base.bubble_fraction


@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_zero_bubble_helps_with_fewer_microbatches_than_ranks(p: int, m: int) -> None:
    zb = simulate(zero_bubble_h1(p, m), forward_time=1, backward_time=2)
    base = simulate(one_f_one_b(p, m), forward_time=1, backward_time=2)
    assert zb.bubble_fraction < base.bubble_fraction


def test_weight_time_defaults_to_half_the_backward() -> None:
    a = simulate(zero_bubble_h1(4, 8), forward_time=1, backward_time=2)
    b = simulate(zero_bubble_h1(4, 8), forward_time=1, backward_time=2, weight_time=1)
    assert a == b
    assert a.busy_time == (24.0,) * 4  # 8 × (F 1 + I 1 + W 1)


# --- communication, by hand ----------------------------------------------------------------------


def test_two_ranks_one_microbatch_with_communication() -> None:
    # 0F0 [0,1] → link 0.5 → 1F0 [1.5,2.5] 1B0 [2.5,4.5] → link 0.5 → 0B0 [5,7]
    result = simulate(one_f_one_b(2, 1), forward_time=1, backward_time=2, comm_time=0.5)
    assert result.step_time == 2 * 1 + 2 * 2 + 2 * 0.5
    events = {(rank, str(a)): (start, end) for rank, a, start, end in result.timeline}
    assert events == {
        (0, "0F0"): (0.0, 1.0),
        (0, "0SF0"): (1.0, 1.5),
        (0, "0RB0"): (1.0, 5.0),
        (0, "0B0"): (5.0, 7.0),
        (1, "1RF0"): (0.0, 1.5),
        (1, "1F0"): (1.5, 2.5),
        (1, "1B0"): (2.5, 4.5),
        (1, "1SB0"): (4.5, 5.0),
    }
    assert result.bubble_fraction == pytest.approx(1 - 6 / 14)


def test_sends_on_one_link_go_one_at_a_time() -> None:
    # F takes 1 but the link takes 3: 0SF1 waits for 0SF0 to arrive at 4, lands at 7.
    result = simulate(gpipe(2, 2), forward_time=1, backward_time=1, comm_time=3)
    events = {str(a): (start, end) for _, a, start, end in result.timeline}
    assert events["0SF0"] == (1.0, 4.0)
    assert events["0SF1"] == (4.0, 7.0)
    assert events["1F1"] == (7.0, 8.0)
    assert result.step_time == 16.0  # 1SB1 lands at 15, 0B1 runs [15, 16]


def test_communication_time_per_cut() -> None:
    # One micro-batch crosses each cut twice; three stages of F 1 and B 2.
    result = simulate(one_f_one_b(3, 1), forward_time=1, backward_time=2, comm_time=[0.25, 4])
    assert result.step_time == 3 * (1 + 2) + 2 * (0.25 + 4)


def test_stages_on_one_rank_pay_no_communication() -> None:
    result = simulate(interleaved_1f1b(1, 2, 3), forward_time=1, backward_time=1, comm_time=9)
    assert result.step_time == 12.0
    assert result.bubble_fraction == 0.0


def test_per_stage_times() -> None:
    # GPipe, slowest stage dominates: step = (m - 1)(f_max + b_max) + sum(f) + sum(b)
    f, b = [1.0, 3.0, 2.0], [2.0, 6.0, 4.0]
    result = simulate(gpipe(3, 4), forward_time=f, backward_time=b)
    assert result.step_time == 3 * (3 + 6) + sum(f) + sum(b)
    assert result.busy_time == (12.0, 36.0, 24.0)


# --- the simulator agrees with itself and with schedules.py --------------------------------------


@st.composite
def cases(draw: st.DrawFn) -> tuple[Schedule, dict[str, list[float]]]:
    name = draw(st.sampled_from(SCHEDULES))
    p = draw(st.integers(1, 6))
    if name == "interleaved":
        sched = build_schedule(
            name, p, p * draw(st.integers(1, 3)), virtual=draw(st.integers(1, 3))
        )
    else:
        sched = build_schedule(name, p, draw(st.integers(1, 12)))
    n = sched.num_stages
    floats = st.floats(0.0, 4.0, allow_nan=False)
    return sched, {
        "forward_time": draw(st.lists(floats, min_size=n, max_size=n)),
        "backward_time": draw(st.lists(floats, min_size=n, max_size=n)),
        "comm_time": draw(st.lists(floats, min_size=n - 1, max_size=n - 1)),
    }


@SETTINGS
@given(cases())
def test_implicit_communication_equals_with_communication(
    case: tuple[Schedule, dict[str, list[float]]],
) -> None:
    sched, times = case
    implicit, explicit = simulate(sched, **times), simulate(with_communication(sched), **times)
    assert implicit == explicit
    assert implicit.timeline == explicit.timeline


@SETTINGS
@given(cases())
def test_timeline_respects_every_dependency(case: tuple[Schedule, dict[str, list[float]]]) -> None:
    sched, times = case
    result = simulate(sched, **times)
    f, b, c = times["forward_time"], times["backward_time"], times["comm_time"]
    when = {(a.kind, a.stage, a.microbatch): (s, e) for _, a, s, e in result.timeline}
    last_end = [0.0] * sched.num_ranks
    for rank, a, start, end in result.timeline:
        if a.kind in (Kind.F, Kind.B, Kind.I, Kind.W):
            assert start >= last_end[rank] - 1e-9  # one compute stream per rank
            last_end[rank] = end
        s, i = a.stage, a.microbatch
        if a.kind is Kind.F:
            assert end - start == pytest.approx(f[s])
            if s > 0:
                hop = c[s - 1] if sched.stage_to_rank(s - 1) != rank else 0.0
                assert start >= when[(Kind.F, s - 1, i)][1] + hop - 1e-9
        if a.kind in (Kind.B, Kind.I):
            share = 1.0 if a.kind is Kind.B else 0.5  # weight_time defaults to half of B
            assert end - start == pytest.approx(b[s] * share)
            assert start >= when[(Kind.F, s, i)][1] - 1e-9
            if s < sched.num_stages - 1:
                hop = c[s] if sched.stage_to_rank(s + 1) != rank else 0.0
                up = when.get((Kind.B, s + 1, i)) or when[(Kind.I, s + 1, i)]
                assert start >= up[1] + hop - 1e-9
        if a.kind is Kind.W:
            assert start >= when[(Kind.I, s, i)][1] - 1e-9
    assert result.step_time == pytest.approx(max(e for *_, e in result.timeline))


@SETTINGS
@given(cases())
def test_peak_activation_matches_schedules_peak_inflight(
    case: tuple[Schedule, dict[str, list[float]]],
) -> None:
    sched, times = case
    result = simulate(sched, **times, activation_bytes=[2.0**s for s in range(sched.num_stages)])
    assert list(result.peak_activation_microbatches) == peak_inflight(sched)
    assert result.peak_activation_bytes == tuple(
        n * 2.0**s for s, n in enumerate(result.peak_activation_microbatches)
    )


def test_result_without_activation_bytes_and_repr_stays_short() -> None:
    result = simulate(one_f_one_b(4, 8), forward_time=1, backward_time=2)
    assert isinstance(result, SimResult)
    assert result.peak_activation_bytes is None
    assert result.peak_activation_microbatches == (4, 3, 2, 1)
    assert "timeline" not in repr(result) and len(repr(result)) < 300


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"forward_time": [1, 2]}, "forward_time has 2 values but the schedule has 4 stages"),
        ({"comm_time": [1, 2]}, "comm_time has 2 values but the schedule has 3 cuts"),
        ({"backward_time": -1}, "backward_time must be finite and >= 0"),
        ({"weight_time": 3}, "weight_time .* exceeds backward_time"),
        ({"activation_bytes": [1.0]}, "activation_bytes has 1 values"),
    ],
)
def test_bad_times_raise(kwargs: dict[str, object], match: str) -> None:
    times: dict[str, object] = {"forward_time": 1.0, "backward_time": 2.0} | kwargs
    with pytest.raises(PlanError, match=match):
        simulate(zero_bubble_h1(4, 4), **times)  # type: ignore[arg-type]


def test_deadlocked_schedule_raises() -> None:
    broken = Schedule.from_text("0F0 0B0 0F1 0B1\n1F0 1F1 1B0 1B1", name="broken")
    with pytest.raises(
        PlanError, match=r"'broken' deadlocks \(rank 0 step 1, rank 1 step 1 all wait\)"
    ):
        simulate(broken, forward_time=1, backward_time=1)


def test_schedule_with_a_missing_producer_raises() -> None:
    broken = Schedule.from_text("0F0 0B0\n1F0 1B0 1F1 1B1", name="broken", num_microbatches=2)
    with pytest.raises(PlanError, match="waits for data nobody sends"):
        simulate(broken, forward_time=1, backward_time=1)


# --- gantt ---------------------------------------------------------------------------------------


def test_gantt_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from partition.schedules.gantt import plot_gantt

    result = simulate(interleaved_1f1b(2, 2, 2), forward_time=1, backward_time=2, comm_time=0.2)
    path = tmp_path / "gantt.png"
    fig = plot_gantt(result.timeline, num_ranks=2, title="interleaved", path=path)
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fig.axes[0].get_title() == "interleaved"


def test_gantt_draws_into_given_axes_and_checks_ranks() -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from partition.schedules.gantt import plot_gantt

    fig = Figure()
    ax = fig.add_subplot()
    timeline = simulate(zero_bubble_h1(3, 3), forward_time=1, backward_time=2).timeline
    assert plot_gantt(timeline, num_ranks=3, ax=ax) is fig
    with pytest.raises(ValueError, match="event on rank 2 but num_ranks=2"):
        plot_gantt(timeline, num_ranks=2)
