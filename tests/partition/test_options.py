"""PlanOptions: one default per knob, every bad value refused on construction with the fix."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, fields

import pytest

from partition.errors import PlanError
from partition.memory import MemoryModel
from partition.microbatch import DEFAULT_MICROBATCHES
from partition.options import PlanOptions, with_knobs
from partition.schedules.names import DEFAULT_SCHEDULE


def test_the_defaults_are_the_shared_ones() -> None:
    o = PlanOptions()
    assert o.schedule == DEFAULT_SCHEDULE and o.microbatches == DEFAULT_MICROBATCHES
    assert (o.virtual, o.algorithm, o.cuts, o.bounds, o.method, o.order) == (
        1,
        "optimal",
        "partitioner",
        None,
        "auto",
        "auto",
    )
    assert o.memory == MemoryModel() and not o.profile


def test_values_are_stored_canonical() -> None:
    o = PlanOptions(schedule="Interleaved-1F1B", virtual=2, bounds=[0, 3.0, 7], leaf_modules=["a"])  # type: ignore[arg-type]
    assert o.schedule == "interleaved" and o.bounds == (0, 3, 7) and o.leaf_modules == ("a",)
    with pytest.raises(FrozenInstanceError):
        o.virtual = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        PlanOptions("1f1b")  # type: ignore[call-arg]  # keyword-only


def test_marker_cuts_linearise_in_program_order_unless_told() -> None:
    assert PlanOptions(cuts="markers").node_order == "graph"
    assert PlanOptions(cuts="markers", order="late").node_order == "late"
    assert PlanOptions().node_order == "auto"


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"microbatches": 0}, "microbatches must be a positive integer, got 0"),
        ({"microbatches": True}, "microbatches must be a positive integer, got True"),
        ({"virtual": 2}, "schedule '1f1b' with 2 stage"),
        ({"schedule": "interleaved"}, "the interleaved schedule needs virtual >= 2"),
        ({"schedule": "zigzag"}, "unknown schedule 'zigzag'"),
        ({"algorithm": "greedy"}, "unknown algorithm 'greedy'; choose one of optimal, uniform"),
        ({"cuts": "manual"}, "unknown cuts 'manual'; choose one of partitioner, markers"),
        ({"method": "jit"}, "unknown method 'jit'; choose one of auto, fx, export"),
        ({"order": "early"}, "unknown order 'early'; choose one of auto, graph, late"),
        ({"memory": "adam"}, "memory must be a MemoryModel, got str"),
        ({"bounds": (0, 4), "cuts": "markers"}, "give bounds or cuts='markers', not both"),
    ],
)
def test_bad_options_fail_on_construction(knobs: dict[str, object], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        PlanOptions(**knobs)  # type: ignore[arg-type]


def test_knobs_apply_over_options_and_unknown_ones_name_the_fields() -> None:
    base = PlanOptions(microbatches=8)
    assert with_knobs(base, {}) is base
    assert with_knobs(None, {}) == PlanOptions()
    changed = with_knobs(base, {"schedule": "gpipe"})
    assert (changed.schedule, changed.microbatches) == ("gpipe", 8)
    with pytest.raises(PlanError, match="unknown schedule"):
        with_knobs(base, {"schedule": "zigzag"})  # checked again on the way
    with pytest.raises(TypeError) as info:
        with_knobs(base, {"micro_batches": 4, "shedule": "1f1b"})
    message = str(info.value)
    assert "unknown planning option(s) micro_batches, shedule" in message
    assert all(f.name in message for f in fields(PlanOptions))
