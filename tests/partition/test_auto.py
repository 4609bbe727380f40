"""The configuration search of ``plan --auto`` ([Note: the configuration search] in
`partition.planning.auto`): it finds the best of an explicit enumeration, ranks its runner-ups,
round-trips through the plan file, and says the fewest devices that fit when nothing does."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import numpy as np
import pytest

from partition import analyze
from partition.auto_choice import Config
from partition.devices import parse_devices
from partition.errors import InfeasibleError, PlanError
from partition.examples import gpt
from partition.memory import MemoryModel
from partition.options import PlanOptions
from partition.plan import Plan
from partition.planning.analysis import Analysis
from partition.planning.assemble import stage_plans
from partition.planning.auto import AutoOptions, devices_for, interpolated, search_configs
from partition.planning.model import plan_auto
from partition.planning.predict import predict_step
from partition.planning.search_space import narrow_cuts
from partition.schedules.names import SCHEDULE_NAMES, stages_per_rank
from partition.solve import min_devices

BATCH = 8
SLOW = "mem=16GiB,tflops=0.001,bw=1TB/s,lat=0"  # compute dominates: more devices help


@pytest.fixture(scope="module")
def toy() -> tuple[object, tuple[object, ...]]:
    model, inputs, _ = gpt("toy", batch=BATCH)
    return model, inputs


@pytest.fixture(scope="module")
def base(toy: tuple[object, tuple[object, ...]]) -> dict[int, Analysis]:
    """The toy traced at every micro-batch count of the batch."""
    model, inputs = toy
    return {m: analyze(model, inputs, microbatches=m) for m in (1, 2, 4, 8)}  # type: ignore[arg-type]


def _analysis_for(base: dict[int, Analysis]):  # type: ignore[no-untyped-def]
    return base.__getitem__


def test_counts_between_two_traces_are_interpolated_exactly(base: dict[int, Analysis]) -> None:
    # The position embedding does not grow with the micro-batch, the rest does in proportion:
    # each node's costs are affine in its rows, so two traces give every count between.
    for m in (2, 4):
        got = interpolated(base[1], base[8], m)
        assert got is not None and got.microbatches == m
        for name in ("compute", "forward", "saved_bytes", "cut_bytes", "param_bytes"):
            np.testing.assert_allclose(
                getattr(got.graph, name), getattr(base[m].graph, name), rtol=1e-12, atol=1e-9
            )


def _enumerate(base: dict[int, Analysis], pool: list, options: PlanOptions, counts: range) -> list:  # type: ignore[type-arg]
    """Every configuration priced the plain way: solve on every cut, predict, no pruning."""
    out = []
    at = _analysis_for(base)
    for p, name, m, rc in itertools.product(counts, SCHEDULE_NAMES, (1, 2, 4, 8), (False, True)):
        virtual = stages_per_rank(name, 2 if name == "interleaved" else 1)
        opts = replace(
            options,
            schedule=name,
            microbatches=m,
            virtual=virtual,
            memory=MemoryModel(recompute=rc),
        )
        analysis = at(m)
        try:
            sol = analysis.solve(devices_for(pool, p), opts)
            step, _ = predict_step(name, virtual, m, stage_plans(analysis.graph, sol))
        except PlanError:  # refused, or nothing fits
            continue
        out.append(
            (
                step,
                p,
                Config(schedule=name, microbatches=m, virtual=virtual, devices=p, recompute=rc),
            )
        )
    return sorted(out, key=lambda t: (t[0], t[1]))


def test_the_search_finds_the_best_of_every_configuration(base: dict[int, Analysis]) -> None:
    pool = parse_devices(SLOW, 3)
    options = PlanOptions(objective="step")
    auto = AutoOptions(global_batch=BATCH, max_devices=3)
    result = search_configs(_analysis_for(base), pool, options, auto)
    every = _enumerate(base, pool, options, range(1, 4))
    best = result.ranked[0].candidate
    assert best.step_time == pytest.approx(every[0][0], rel=1e-12)
    assert best.config.devices == every[0][1]
    steps = [p.candidate.step_time for p in result.ranked]
    assert steps == sorted(steps)  # the runner-ups, best first
    # each is what its configuration predicts priced the plain way
    priced = {c: s for s, _, c in every}
    for p in result.ranked:
        assert p.candidate.step_time == pytest.approx(priced[p.candidate.config], rel=1e-12)
    assert result.searched < len(every) + 8 * 3  # the bounds skipped some
    assert any("interleaved" in why for why in result.skipped)  # 1 micro-batch on 2 ranks


def test_screening_on_few_cuts_still_finds_the_best(base: dict[int, Analysis]) -> None:
    """Screening solves on a few cuts spread over the compute, not the narrowest of the graph:
    those crowd by the inputs, where a split leaves all the work on one stage and every
    configuration looks alike (GPT-2 over A100s chose 1 micro-batch at 3x the best step)."""
    pool = parse_devices(SLOW, 3)
    options = PlanOptions(objective="step")
    screened = AutoOptions(global_batch=BATCH, max_devices=3, cuts=6)
    assert narrow_cuts(base[1].graph, 6) is not None  # the toy is screened at 6 cuts
    result = search_configs(_analysis_for(base), pool, options, screened)
    every = _enumerate(base, pool, options, range(1, 4))
    assert result.ranked[0].candidate.step_time == pytest.approx(every[0][0], rel=1e-9)


def test_screening_cuts_take_the_narrowest_of_each_share_of_the_compute(
    base: dict[int, Analysis],
) -> None:
    graph = base[4].graph
    cuts = narrow_cuts(graph, 6)
    assert cuts is not None and 1 < len(cuts) <= 6
    done = np.cumsum(graph.compute)
    windows = [min(int(done[c - 1] / done[-1] * 6), 5) for c in cuts]
    assert windows == sorted(set(windows))  # one per window, rising
    for c, w in zip(cuts, windows, strict=True):
        same = [k for k in range(1, len(graph)) if min(int(done[k - 1] / done[-1] * 6), 5) == w]
        assert graph.cut_bytes[c] == min(graph.cut_bytes[k] for k in same)


def test_throughput_per_device_prefers_fewer_devices_when_links_dominate(
    base: dict[int, Analysis],
) -> None:
    pool = parse_devices("cpu", 4)  # the toy's links cost more than its compute
    auto = AutoOptions(global_batch=BATCH, max_devices=4, objective="throughput")
    result = search_configs(_analysis_for(base), pool, PlanOptions(), auto)
    best = result.ranked[0].candidate
    assert best.config.devices == 1
    tops = [p.candidate.throughput for p in result.ranked]
    assert all(a >= b * (1 - 1e-9) for a, b in itertools.pairwise(tops))  # best first


def test_the_plan_records_its_choice_and_round_trips(
    toy: tuple[object, tuple[object, ...]],
) -> None:
    model, inputs = toy
    auto = AutoOptions(global_batch=BATCH, max_devices=3)
    plan = plan_auto(model, inputs, pool=parse_devices(SLOW, 3), auto=auto)  # type: ignore[arg-type]
    choice = plan.auto
    assert choice is not None and 1 <= len(choice.runner_ups) <= 5
    config = choice.chosen.config
    assert (plan.schedule, plan.microbatches, plan.num_ranks) == (
        config.schedule,
        config.microbatches,
        config.devices,
    )
    assert plan.memory_model.recompute == config.recompute
    assert choice.chosen.step_time == plan.step_time  # the plan's own prediction
    assert all(r.step_time >= choice.chosen.step_time * (1 - 1e-9) for r in choice.runner_ups)
    steps = [r.step_time for r in choice.runner_ups]
    assert steps == sorted(steps)
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.auto == choice
    data = json.loads(plan.to_json())
    data["auto"]["chosen"]["config"]["devices"] = "three"
    with pytest.raises(PlanError, match=r"auto\.chosen\.config\.devices"):
        Plan.from_dict(data)


def test_nothing_fits_says_the_fewest_devices_that_would(base: dict[int, Analysis]) -> None:
    pool = parse_devices("mem=120KiB,tflops=1,bw=1TB/s,lat=0", 2)
    auto = AutoOptions(global_batch=BATCH, max_devices=2)
    with pytest.raises(InfeasibleError, match=r"fewest devices that fit is (\d+)") as err:
        search_configs(_analysis_for(base), pool, PlanOptions(), auto)
    import re

    fewest = int(re.search(r"fewest devices that fit is (\d+)", str(err.value)).group(1))  # type: ignore[union-attr]
    assert fewest > 2
    assert "1f1b · 8 mb" in str(err.value) and "recompute" in str(err.value)
    from partition.solve import Problem

    problem = Problem(
        graph=base[8].graph,
        devices=devices_for(pool, fewest),
        schedule="1f1b",
        microbatches=8,
        memory=MemoryModel(recompute=True),
    )
    assert min_devices(problem) == fewest


def test_bad_auto_options_say_what_to_change() -> None:
    with pytest.raises(
        PlanError, match="do not divide the global batch of 8; use one of 1, 2, 4, 8"
    ):
        AutoOptions(global_batch=8, devices=2, microbatches=(3,))
    with pytest.raises(PlanError, match="one of them"):
        AutoOptions(global_batch=8, devices=2, max_devices=4)
    with pytest.raises(PlanError, match="unknown auto objective"):
        AutoOptions(global_batch=8, devices=2, objective="fast")
