"""An error on a rank says where: ``[rank r · stage s · step k · sFi]``, and keeps its type."""

from __future__ import annotations

import pytest

from partition.errors import PipepartError, StageError
from partition.schedules.actions import Action, Kind
from pipeline.runtime.failure import locate, place


def test_the_place_of_an_action_and_of_other_work() -> None:
    assert place(2, 14, Action(2, Kind.B, 5)) == "rank 2 · stage 2 · step 14 · 2B5"
    assert place(1, 0, Action(3, Kind.SEND_F, 1)) == "rank 1 · stage 3 · step 0 · 3SF1"
    assert place(0, 3, what="optimizer") == "rank 0 · step 3 · optimizer"


def test_a_located_error_is_a_stage_error_and_still_its_own_type() -> None:
    cause = KeyError("h")
    error = locate(cause, 1, 7, Action(1, Kind.F, 2))
    assert isinstance(error, StageError) and isinstance(error, PipepartError)
    assert isinstance(error, KeyError)  # `except KeyError` still catches it
    assert str(error) == "[rank 1 · stage 1 · step 7 · 1F2] KeyError: 'h'"


def test_an_error_that_cannot_take_a_message_is_still_located() -> None:
    class Picky(Exception):
        def __init__(self, a: int, b: int) -> None:
            super().__init__(a, b)

    error = locate(Picky(1, 2), 0, 0, what="flush")
    assert isinstance(error, StageError)
    assert str(error).startswith("[rank 0 · step 0 · flush] Picky:")


def test_the_innermost_place_wins() -> None:
    inner = locate(ValueError("bad"), 0, 1, Action(0, Kind.F, 0))
    assert locate(inner, 0, 1, what="gradients") is inner


def test_raising_it_chains_the_original() -> None:
    cause = ZeroDivisionError("division by zero")
    with pytest.raises(ZeroDivisionError) as err:
        try:
            raise cause
        except ZeroDivisionError as e:
            raise locate(e, 2, 1, Action(2, Kind.F, 1)) from e
    assert err.value.__cause__ is cause
    assert "[rank 2 · stage 2 · step 1 · 2F1]" in str(err.value)
