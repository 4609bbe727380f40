"""The exception hierarchy: one base, each error also a standard type, re-raised errors keep theirs."""

from __future__ import annotations

import pytest

import partition.errors as errors
from partition.errors import (
    BatchError,
    FactoryError,
    InputError,
    PipepartError,
    PlanError,
    StageError,
    factory_error,
    stage_error,
)

STANDARD = {
    "TraceError": RuntimeError,
    "PlanError": ValueError,
    "InfeasibleError": ValueError,
    "CheckpointError": ValueError,
    "FactoryError": RuntimeError,
    "StageError": RuntimeError,
    "InputError": TypeError,
    "BatchError": ValueError,
    "BoundaryError": PlanError,
    "PeerError": ConnectionError,
    "NonFiniteError": FloatingPointError,
}


def test_every_error_is_a_pipepart_error_and_a_standard_type() -> None:
    classes = {n: getattr(errors, n) for n in errors.__all__ if n[0].isupper()}
    assert set(classes) == {*STANDARD, "PipepartError"}
    for name, standard in STANDARD.items():
        assert issubclass(classes[name], PipepartError) and issubclass(classes[name], standard)
    assert issubclass(BatchError, InputError)  # a batch of the wrong size is a bad input


def test_a_re_raised_error_is_also_what_was_raised() -> None:
    err = factory_error(FileNotFoundError("weights.bin"), "the factory raised ...")
    assert isinstance(err, FactoryError) and isinstance(err, FileNotFoundError)
    assert type(err).__name__ == "FactoryFileNotFoundError" and str(err) == "the factory raised ..."
    again = factory_error(FileNotFoundError("x"), "m")
    assert type(again) is type(err)  # one class per pair, made once
    staged = stage_error(KeyError("k"), "[rank 1 · stage 1] KeyError: 'k'")
    assert isinstance(staged, StageError) and isinstance(staged, KeyError)
    assert str(staged) == "[rank 1 · stage 1] KeyError: 'k'"  # not KeyError's repr of the key
    with pytest.raises(ValueError, match="bad value"):  # `except ValueError` still catches it
        raise stage_error(ValueError("v"), "bad value")


def test_a_type_that_cannot_be_mixed_in_gives_the_plain_error() -> None:
    class Sealed(Exception):
        def __init_subclass__(cls) -> None:  # no subclass, so no StageSealed either
            raise TypeError("Sealed is final")

    err = stage_error(Sealed("inner"), "it failed")
    assert type(err) is StageError and str(err) == "it failed"
    plain = factory_error(Sealed("inner"), "the factory raised Sealed")
    assert type(plain) is FactoryError and str(plain) == "the factory raised Sealed"
