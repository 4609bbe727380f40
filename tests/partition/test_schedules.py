"""Schedules as data (design row R3): built, validated, printed and parsed with no process."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from partition.errors import PlanError
from partition.schedules.actions import (
    SCHEDULES,
    Action,
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
from partition.schedules.check import validate

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True)


@st.composite
def schedules(draw: st.DrawFn) -> Schedule:
    """Every builder, p in 1..8, m in 1..32 (m < p included), v in 1..4 where valid."""
    name = draw(st.sampled_from(SCHEDULES))
    p = draw(st.integers(1, 8))
    if name == "interleaved":  # Megatron's rule: m a multiple of p
        return build_schedule(
            name, p, p * draw(st.integers(1, 32 // p)), virtual=draw(st.integers(1, 4))
        )
    return build_schedule(name, p, draw(st.integers(1, 32)))


def _computes(schedule: Schedule) -> list[Action]:
    return [
        a for row in schedule.actions for a in row if a.kind in (Kind.F, Kind.B, Kind.I, Kind.W)
    ]


# --- every built schedule is valid ------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_small_schedule_validates_with_and_without_communication(name: str) -> None:
    """R3, exhaustively: p in 1..8, m in 1..32 (m < p included), v in 1..4 where valid."""
    for p in range(1, 9):
        for m in range(1, 33):
            for v in range(1, 5) if name == "interleaved" else (1,):
                if name == "interleaved" and m % p:
                    continue
                schedule = build_schedule(name, p, m, virtual=v)
                validate(schedule)
                validate(with_communication(schedule))


@SETTINGS
@given(schedules())
def test_one_forward_and_one_backward_per_stage_and_microbatch(schedule: Schedule) -> None:
    counts = Counter((a.stage, a.microbatch, a.kind) for a in _computes(schedule))
    split = schedule.name in ("zb-h1", "zb-v")  # dualpipev: B, or I and W from its middle on
    for s in range(schedule.num_stages):
        for i in range(schedule.num_microbatches):
            assert counts[(s, i, Kind.F)] == 1
            halves = (counts[(s, i, Kind.I)], counts[(s, i, Kind.W)])
            assert (counts[(s, i, Kind.B)], halves) in (((0, (1, 1))), (1, (0, 0)))
            if split or schedule.name in ("gpipe", "1f1b", "interleaved"):
                assert halves == ((1, 1) if split else (0, 0))
    assert sum(counts.values()) == schedule.num_stages * schedule.num_microbatches * 2 + sum(
        n for (_, _, kind), n in counts.items() if kind is Kind.W
    )


@SETTINGS
@given(schedules())
def test_every_send_has_exactly_one_receive_on_the_peer(schedule: Schedule) -> None:
    comm = with_communication(schedule)
    sends: Counter[tuple[int, int, int, str]] = Counter()
    recvs: Counter[tuple[int, int, int, str]] = Counter()
    for rank, row in enumerate(comm.actions):
        for a in row:
            s, i = a.stage, a.microbatch
            if a.kind is Kind.SEND_F:
                sends[(rank, comm.stage_to_rank(s + 1), i, "F")] += 1
            elif a.kind is Kind.SEND_B:
                sends[(rank, comm.stage_to_rank(s - 1), i, "B")] += 1
            elif a.kind is Kind.RECV_F:
                recvs[(comm.stage_to_rank(s - 1), rank, i, "F")] += 1
            elif a.kind is Kind.RECV_B:
                recvs[(comm.stage_to_rank(s + 1), rank, i, "B")] += 1
    assert sends == recvs
    cross = sum(
        comm.stage_to_rank(s) != comm.stage_to_rank(s + 1) for s in range(comm.num_stages - 1)
    )
    assert sum(sends.values()) == 2 * cross * comm.num_microbatches


@SETTINGS
@given(schedules())
def test_text_form_round_trips(schedule: Schedule) -> None:
    for sched in (schedule, with_communication(schedule)):
        text = sched.to_text()
        back = Schedule.from_text(text, name=sched.name, num_microbatches=sched.num_microbatches)
        assert back == sched
        assert back.to_text() == text


@SETTINGS
@given(schedules())
def test_peak_inflight_matches_theory(schedule: Schedule) -> None:
    p, m = schedule.num_ranks, schedule.num_microbatches
    peak = peak_inflight(schedule)
    if schedule.name == "gpipe":
        assert peak == [m] * p
    elif schedule.name == "1f1b":
        assert peak == [min(p - s, m) for s in range(schedule.num_stages)]
    elif schedule.name == "zb-h1":  # [Note: ZB-H1 memory]: 1F1B's worst stage, on every stage
        assert peak == [min(p, m)] * p
        assert max(peak) == max(peak_inflight(one_f_one_b(p, m)))
    else:
        assert all(1 <= x <= m for x in peak)


@pytest.mark.parametrize(("p", "m"), [(1, 1), (2, 1), (4, 2), (4, 8), (8, 32)])
def test_zero_bubble_never_holds_more_than_1f1b_at_peak(p: int, m: int) -> None:
    assert max(peak_inflight(zero_bubble_h1(p, m))) <= max(peak_inflight(one_f_one_b(p, m)))


# --- the builders' shapes ----------------------------------------------------------------------


def test_1f1b_text_for_two_ranks() -> None:
    assert one_f_one_b(2, 3).to_text() == "0F0 0F1 0B0 0F2 0B1 0B2\n1F0 1B0 1F1 1B1 1F2 1B2"


def test_gpipe_runs_all_forwards_then_all_backwards() -> None:
    assert gpipe(2, 2).to_text() == "0F0 0F1 0B0 0B1\n1F0 1F1 1B0 1B1"


def test_zero_bubble_defers_weight_gradients_on_later_ranks() -> None:
    text = zero_bubble_h1(2, 2).to_text().split("\n")
    assert text == ["0F0 0F1 0I0 0W0 0I1 0W1", "1F0 1I0 1F1 1I1 1W0 1W1"]


def test_interleaved_places_stage_s_on_rank_s_mod_p() -> None:
    sched = interleaved_1f1b(2, 4, 3)
    assert sched.num_stages == 6
    assert sched.stages_of(1) == (1, 3, 5)
    assert [sched.stage_to_rank(s) for s in range(6)] == [0, 1, 0, 1, 0, 1]
    for rank, row in enumerate(sched.actions):
        assert {a.stage for a in row} == set(sched.stages_of(rank))
    assert sched.actions[0][:4] == tuple(map(Action.parse, ["0F0", "0F1", "2F0", "2F1"]))


def test_interleaved_with_one_virtual_stage_is_1f1b() -> None:
    assert interleaved_1f1b(3, 5, 1) == one_f_one_b(3, 5)


def test_stages_on_one_rank_need_no_communication() -> None:
    sched = interleaved_1f1b(1, 3, 4)  # four stages, all on rank 0
    assert with_communication(sched) == sched
    validate(sched)


def test_with_communication_places_receive_before_and_send_after() -> None:
    comm = with_communication(one_f_one_b(2, 1))
    assert comm.to_text() == "0F0 0SF0 0RB0 0B0\n1RF0 1F0 1B0 1SB0"
    assert with_communication(comm) is comm


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("1F1B", "1f1b"),
        ("pipedream_flush", "1f1b"),
        ("pipedream-flush", "1f1b"),
        ("zbh1", "zb-h1"),
        ("ZB_H1", "zb-h1"),
        (" GPipe ", "gpipe"),
        ("interleaved-1f1b", "interleaved"),
        ("Interleaved_1F1B", "interleaved"),
    ],
)
def test_build_schedule_accepts_aliases(alias: str, name: str) -> None:
    virtual = 2 if name == "interleaved" else 1  # (interleaved with 1 stage per rank is 1F1B)
    built = build_schedule(alias, 2, 4, virtual)
    assert built.name == name
    assert built.to_text() == build_schedule(name, 2, 4, virtual).to_text()  # the same actions


# --- actions and text --------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["1F0", "2SB3", "0RF11", "12W4", "3I0", "5RB2", "0SF0", "7B7"])
def test_action_text_round_trips(text: str) -> None:
    assert str(Action.parse(text)) == text


def test_action_prints_compactly() -> None:
    assert str(Action(1, Kind.F, 0)) == "1F0"
    assert str(Action(2, Kind.SEND_B, 3)) == "2SB3"
    assert Action.parse("2SB3") == Action(2, Kind.SEND_B, 3)


@pytest.mark.parametrize("text", ["", "F0", "1X0", "1F", "1 F 0", "-1F0"])
def test_bad_action_text_is_rejected(text: str) -> None:
    with pytest.raises(PlanError, match="cannot parse action"):
        Action.parse(text)


def test_from_text_accepts_a_trailing_newline_and_infers_sizes() -> None:
    sched = Schedule.from_text("0F0 0F1 0B0 0B1\n1F0 1F1 1B0 1B1\n", name="gpipe")
    assert sched == gpipe(2, 2)


def test_table_is_step_by_rank_and_marks_a_cell() -> None:
    table = one_f_one_b(2, 2).table(mark=(1, 2))
    lines = table.split("\n")
    assert "rank 0" in lines[0] and "rank 1" in lines[0]
    assert len(lines) == 2 + 4  # header, rule, four steps
    assert ">1F1" in lines[4]


# --- bad input -----------------------------------------------------------------------------------


def test_interleaved_needs_microbatches_a_multiple_of_ranks() -> None:
    with pytest.raises(PlanError, match=r"got 6 micro-batches on 4 ranks.*use 4 or 8") as err:
        interleaved_1f1b(4, 6, 2)
    assert "multiple" in str(err.value) and "1f1b" in str(err.value)
    with pytest.raises(PlanError, match="got 2 micro-batches on 4 ranks"):
        build_schedule("interleaved", 4, 2, virtual=2)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: build_schedule("dualpipe", 2, 4), "unknown schedule 'dualpipe'"),
        (lambda: build_schedule("1f1b", 2, 0), "0 micro-batches"),
        (lambda: gpipe(0, 4), "0 ranks"),
        (lambda: zero_bubble_h1(2, -1), "-1 micro-batches"),
        (lambda: build_schedule("gpipe", 2, 4, virtual=2), "virtual=2"),
        (lambda: interleaved_1f1b(2, 4, 0), "virtual >= 1"),
        (lambda: Schedule("x", 2, 2, 1, ((Action(0, Kind.F, 0),),)), "declares 2 ranks"),
    ],
)
def test_bad_input_raises_plan_error(call: object, match: str) -> None:
    with pytest.raises(PlanError, match=match):
        call()  # type: ignore[operator]
