"""Checking a schedule with no process: hand-broken schedules are rejected, naming rank and step,
and every link carries micro-batches in the order both ends expect."""

from __future__ import annotations

import pytest

from partition.errors import PlanError
from partition.schedules.actions import (
    SCHEDULES,
    Schedule,
    build_schedule,
    one_f_one_b,
    with_communication,
)
from partition.schedules.check import check_channel_order, validate

# --- hand-broken schedules are rejected, pointing at rank and step ----------------------------


def _edit(text: str) -> Schedule:
    return Schedule.from_text(text, name="broken")


def test_swapped_order_is_rejected_naming_rank_and_step() -> None:
    broken = _edit("0F0 0F1 0B0 0B1\n1B0 1F0 1F1 1B1")  # rank 1 runs B0 before F0
    with pytest.raises(PlanError, match=r"\[rank 1 · step 0 · 1B0\] needs 1F0") as err:
        validate(broken)
    assert ">1B0" in str(err.value)  # the table points at the cell


def test_missing_receive_is_rejected_naming_rank_and_step() -> None:
    comm = with_communication(one_f_one_b(2, 2)).to_text()
    broken = _edit(comm.replace("1RF1 ", ""))
    with pytest.raises(PlanError, match=r"rank 0 · step 3 · 0SF1\] no matching 1RF1 on rank 1"):
        validate(broken)


def test_receive_after_its_consumer_is_rejected() -> None:
    broken = _edit("0F0 0SF0 0RB0 0B0\n1F0 1RF0 1B0 1SB0")
    with pytest.raises(PlanError, match=r"rank 1 · step 0 · 1F0\] needs 1RF0 before it on rank 1"):
        validate(broken)


def test_deadlock_is_rejected_naming_every_waiting_rank() -> None:
    # rank 0 wants B0 back before it sends F1; rank 1 wants F1 before it returns B0.
    broken = _edit("0F0 0B0 0F1 0B1\n1F0 1F1 1B0 1B1")
    with pytest.raises(PlanError, match="deadlock") as err:
        validate(broken)
    message = str(err.value)
    assert "rank 0 step 1 (0B0) waits for 1B0 on rank 1" in message
    assert "rank 1 step 1 (1F1) waits for 0F1 on rank 0" in message
    with pytest.raises(PlanError, match="deadlock") as err:
        validate(with_communication(broken))
    message = str(err.value)
    assert "rank 0 step 2 (0RB0) waits for 1SB0 on rank 1" in message
    assert "rank 1 step 2 (1RF1) waits for 0SF1 on rank 0" in message


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("0F0 0B0\n1F0 1B0 1F0", r"rank 1 · step 2 · 1F0\] duplicate of rank 1 step 0"),
        ("0F0 0B0\n1F0", r"rank 1 · step 0 · 1F0\] this forward has no backward.*add 1B0"),
        ("0F0 0B0\n1B0", "stage 1 micro-batch 0 has no forward; add 1F0 on rank 1"),
        ("0F0 0B0\n1F0 1B0 0F1", "stage 0 lives on rank 0"),
        ("0F0 0I0\n1F0 1I0 1W0", r"rank 0 · step 1 · 0I0\] no 0W0 to pair with it"),
        ("0F0 0B0 0W0\n1F0 1B0", r"rank 0 · step 2 · 0W0\] no 0I0 to pair with it"),
        ("0F0 0I0 0W0\n1F0 1W0 1I0", r"rank 1 · step 1 · 1W0\] needs 1B0"),
        ("0F0 0B0 0SB0\n1F0 1B0", "no stage -1 on another rank"),
    ],
)
def test_structural_errors_are_rejected(text: str, match: str) -> None:
    with pytest.raises(PlanError, match=match):
        validate(_edit(text))


# --- the order of every link ------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_built_schedule_keeps_each_link_in_order(name: str) -> None:
    for p, m in [(2, 4), (3, 6), (4, 8), (4, 4)]:
        check_channel_order(
            with_communication(build_schedule(name, p, m, 2 if name == "interleaved" else 1))
        )


def test_a_link_out_of_order_names_the_stage_and_both_orders() -> None:
    # rank 1 receives micro-batch 1 before 0: valid as a dependency graph (it blocks until
    # the send has run), but the messages on the link would pair up crosswise
    broken = _edit("0F0 0SF0 0F1 0SF1 0RB0 0B0 0RB1 0B1\n1RF1 1RF0 1F0 1F1 1B0 1SB0 1B1 1SB1")
    with pytest.raises(
        PlanError,
        match=r"stage 0 sends activations for micro-batches \[0, 1\] but they are received in the "
        r"order \[1, 0\]",
    ):
        check_channel_order(broken)
    gradients = _edit("0F0 0SF0 0F1 0SF1 0RB1 0RB0 0B0 0B1\n1RF0 1RF1 1F0 1F1 1B0 1SB0 1B1 1SB1")
    with pytest.raises(PlanError, match=r"stage 1 sends gradients for micro-batches \[0, 1\]"):
        check_channel_order(gradients)
    check_channel_order(with_communication(one_f_one_b(2, 2)))
