"""In-flight micro-batches: what the planner prices is what running each schedule holds, and the
closed forms are exact (GPipe, 1F1B, ZB-H1, ZB-V, DualPipeV) or a safe bound (interleaved)."""

from __future__ import annotations

import pytest

from partition.errors import PlanError
from partition.schedules.actions import SCHEDULES, Kind, Schedule, build_schedule, peak_inflight
from partition.schedules.inflight import (
    closed_form_inflight,
    inflight_microbatches,
    schedule_inflight,
)


def _inflight_cases(name: str) -> list[tuple[int, int, int]]:
    """p <= 8, m <= 32 (interleaved: v in 2, 3 and m a multiple of p, the schedule's rule)."""
    virtuals = (2, 3) if name == "interleaved" else (1,)
    return [
        (p, m, v)
        for p in range(1, 9)
        for m in range(1, 33)
        for v in virtuals
        if name != "interleaved" or m % p == 0
    ]


def _held_by_running(schedule: Schedule) -> list[int]:
    """Per stage, the most micro-batches whose activations are alive at once, found by running
    the actions in time order: a micro-batch is held from its F until the backward that frees
    its activations (B, or W for zero-bubble, whose I keeps them for W; DualPipeV has both)."""
    alive: list[set[int]] = [set() for _ in range(schedule.num_stages)]
    most = [0] * schedule.num_stages
    for t in range(max(len(row) for row in schedule.actions)):
        for row in schedule.actions:
            if t >= len(row):
                continue
            a = row[t]
            if a.kind is Kind.F:
                alive[a.stage].add(a.microbatch)
                most[a.stage] = max(most[a.stage], len(alive[a.stage]))
            elif a.kind in (Kind.B, Kind.W):
                alive[a.stage].discard(a.microbatch)
    return most


@pytest.mark.parametrize("name", SCHEDULES)
def test_the_planner_budgets_what_the_schedule_holds(name: str) -> None:
    """The in-flight counts the planner prices (`partition.planning.model.schedule_inflight`, what
    `plan_model` hands the partitioner) are what running the schedule holds, p <= 8, m <= 32."""
    wrong = []
    for p, m, v in _inflight_cases(name):
        held = _held_by_running(build_schedule(name, p, m, v))
        planned = list(schedule_inflight(name, p, m, v))
        if planned != held:
            wrong.append((p, m, v, planned, held))
    assert wrong == []


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb-h1", "zb-v", "dualpipev"])
def test_closed_forms_are_the_schedules_own(name: str) -> None:
    """`partition.memory`'s closed forms (used when the schedule cannot be built) are exact for
    these schedules — ZB-H1 holds min(p, m) on every stage: its W runs late."""
    for p, m, v in _inflight_cases(name):
        assert list(closed_form_inflight(name, p, m, v)) == peak_inflight(
            build_schedule(name, p, m, v)
        ), (p, m, v)


def test_the_interleaved_closed_form_is_a_safe_bound() -> None:
    """Interleaved's closed form never budgets fewer micro-batches than the schedule holds."""
    for p, m, v in _inflight_cases("interleaved"):
        bound = closed_form_inflight("interleaved", p, m, v)
        held = peak_inflight(build_schedule("interleaved", p, m, v))
        assert all(b >= h for b, h in zip(bound, held, strict=True)), (p, m, v, bound, held)


@pytest.mark.parametrize(
    ("name", "ranks", "microbatches", "virtual"),
    [
        ("gpipe", 3, 6, 1),
        ("1f1b", 4, 8, 1),
        ("zb-h1", 4, 8, 1),
        ("interleaved", 2, 4, 2),
        ("zb-v", 2, 4, 2),
        ("dualpipev", 2, 4, 2),
    ],
)
def test_a_plan_prices_each_stage_for_what_it_holds(
    name: str, ranks: int, microbatches: int, virtual: int
) -> None:
    """Through `plan_model` on a traced model: each stage's in-flight count is what running the
    schedule holds, and its activation memory is that many micro-batches of its saved bytes."""
    import torch

    from partition import plan_model
    from partition.devices import parse_devices
    from partition.models.examples import gpt

    with torch.device("meta"):
        model, inputs, _ = gpt("toy", batch=microbatches, seq=8, layers=4)
    plan = plan_model(
        model,
        inputs,
        devices=parse_devices("cpu", ranks),
        schedule=name,
        microbatches=microbatches,
        virtual=virtual,
    )
    held = _held_by_running(build_schedule(name, ranks, microbatches, virtual))
    assert [s.inflight for s in plan.stages] == held
    for stage in plan.stages:
        assert stage.memory["activations"] == pytest.approx(stage.inflight * stage.saved_bytes)


def test_a_count_the_schedule_cannot_run_is_priced_by_its_closed_form() -> None:
    # interleaved needs the micro-batches a multiple of the ranks: 6 on 4 ranks cannot be built
    with pytest.raises(PlanError):
        build_schedule("interleaved", 4, 6, 2)
    assert schedule_inflight("interleaved", 4, 6, 2) == tuple(
        inflight_microbatches("interleaved", s, 8, 6, 2) for s in range(8)
    )


def test_the_interleaved_bound_is_megatrons_warm_up_plus_one() -> None:
    # p = 4, v = 2, m = 16: rank r warms up 2 (p - r - 1) + (v - 1) p forwards, plus the one
    # it holds while its first backward waits
    assert [inflight_microbatches("interleaved", s, 8, 16, 2) for s in range(4)] == [11, 9, 7, 5]
    assert inflight_microbatches("interleaved", 4, 8, 16, 2) == 11  # stage 4 is on rank 0
    assert inflight_microbatches("interleaved", 0, 8, 3, 2) == 3  # never more than m


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("1f1b", 0, 4, 0), "micro-batches must be at least 1, got 0"),
        (("1f1b", 4, 4, 8), "stage 4 out of range for 4 stages"),
        (("interleaved", 0, 6, 8, 4), "6 virtual stages do not divide into 4 per rank"),
        (("zigzag", 0, 4, 8), "unknown schedule 'zigzag'"),
    ],
)
def test_bad_counts_are_refused(args: tuple[object, ...], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        inflight_microbatches(*args)  # type: ignore[arg-type]
