"""What a run reports (`pipeline.launch.results`): `summarize` over the ranks' own reports, and
``RunResult.to_json`` (``pipepart run --json``). The ranks' reports are written by hand, so
every number expected here is worked out from them in the test."""

from __future__ import annotations

import json
import math

from pipeline.launch.job import RankResult, TimedAction
from pipeline.launch.reference import CheckResult
from pipeline.launch.results import RunResult, StepResult, summarize


def _rank(
    rank: int,
    losses: list[float | None],
    times: list[float],
    timelines: list[list[TimedAction]],
    *,
    resumed_from: int = 0,
) -> RankResult:
    return RankResult(
        rank=rank,
        stages=[rank, rank + 2],
        microbatches=4,
        losses=losses,
        times=times,
        timelines=timelines,
        weights=["factory"] if rank == 0 else ["checkpoint", "factory"],
        resumed_from=resumed_from,
    )


def _two_ranks() -> list[RankResult]:
    """3 steps on 2 ranks: the loss on rank 1, rank 0 slower at step 1; each step's actions at
    ``time.monotonic()`` values (about 1000 s), the last step's starting at 1000.5 on rank 1."""
    first = [(0, "0F0", 990.0, 990.2)]
    return [
        _rank(
            0,
            [None, None, None],
            [0.5, 0.9, 0.25],
            [first, first, [(0, "0F0", 1000.75, 1001.0), (0, "0B0", 1001.5, 1002.0)]],
        ),
        _rank(
            1,
            [2.5, 2.25, 2.0],
            [0.75, 0.5, 0.25],
            [first, first, [(1, "1F0", 1000.5, 1001.25), (1, "1B0", 1001.25, 1001.5)]],
        ),
    ]


def test_each_step_has_the_slowest_rank_s_time_and_the_loss() -> None:
    result = summarize(_two_ranks(), steps=3)
    assert result.steps == [
        StepResult(step=0, time=0.75, loss=2.5),
        StepResult(step=1, time=0.9, loss=2.25),
        StepResult(step=2, time=0.25, loss=2.0),
    ]
    assert result.ranks == 2 and result.restarts == 0 and result.resumed_from == 0
    assert result.stages == {0: [0, 2], 1: [1, 3]}
    assert result.weights == {0: ["factory"], 1: ["checkpoint", "factory"]}
    assert result.check is None
    assert [r.rank for r in result.rank_results] == [0, 1]


def test_the_loss_comes_from_whichever_rank_had_it() -> None:
    ranks = _two_ranks()
    ranks[0].losses = [None, 7.0, None]  # rank 0 had step 1's (as after a restart)
    ranks[1].losses = [2.5, None, None]  # nobody had step 2's
    assert [s.loss for s in summarize(ranks, steps=3).steps] == [2.5, 7.0, None]


def test_only_the_first_steps_are_summarized() -> None:
    result = summarize(_two_ranks(), steps=2)
    assert [(s.step, s.time, s.loss) for s in result.steps] == [(0, 0.75, 2.5), (1, 0.9, 2.25)]


def test_the_timeline_is_the_last_step_from_its_first_action() -> None:
    result = summarize(_two_ranks(), steps=3)
    assert result.timeline == [  # 1000.5, rank 1's first action, is 0
        (0, "0F0", 0.25, 0.5),
        (0, "0B0", 1.0, 1.5),
        (1, "1F0", 0.0, 0.75),
        (1, "1B0", 0.75, 1.0),
    ]


def test_a_resumed_run_starts_at_the_earliest_rank_s_step() -> None:
    """Resumed at step 2 of 3: the steps before have no time (NaN), and a run resumed at its
    last step has no timeline."""
    nan = math.nan
    ranks = [
        _rank(0, [None] * 3, [nan, nan, 0.5], [[], [], [(0, "0F0", 5.0, 6.0)]], resumed_from=2),
        _rank(1, [1.0, 0.5, 0.25], [nan, nan, 0.25], [[], [], []], resumed_from=2),
    ]
    result = summarize(ranks, steps=3, restarts=1)
    assert result.resumed_from == 2 and result.restarts == 1
    assert [s.loss for s in result.steps] == [1.0, 0.5, 0.25]
    assert math.isnan(result.steps[0].time) and result.steps[2].time == 0.5
    assert result.timeline == [(0, "0F0", 0.0, 1.0)]
    ranks[0].timelines[-1] = []
    ranks[0].resumed_from = 3
    assert summarize(ranks, steps=3).timeline == [] and summarize(ranks, 3).resumed_from == 2


# --- JSON ---------------------------------------------------------------------------------------


def _check() -> CheckResult:
    return CheckResult(
        loss=1e-7,
        grads=2e-7,
        params=0.0,
        buffers=0.0,
        worst={"grads": "fc.weight"},
        tolerance=1e-5,
        failures=[],
        losses=[2.5, 2.25, 2.0],
        reference_losses=[2.5, 2.25, 2.0],
    )


def test_to_json_has_the_run_s_keys_and_check_only_when_it_ran() -> None:
    result = summarize(_two_ranks(), steps=3)
    out = result.to_json()
    assert list(out) == [
        "ranks",
        "stages",
        "weights",
        "steps",
        "restarts",
        "resumed_from",
        "timeline",
        "notes",
    ]
    assert out["steps"] == [
        {"step": 0, "time": 0.75, "loss": 2.5},
        {"step": 1, "time": 0.9, "loss": 2.25},
        {"step": 2, "time": 0.25, "loss": 2.0},
    ]
    assert out["timeline"][0] == [0, "0F0", 0.25, 0.5]
    assert "rank_results" not in out
    # plain JSON: through a file and back, only the ranks' keys become text
    back = json.loads(json.dumps(out))
    assert back["stages"] == {"0": [0, 2], "1": [1, 3]} and back["steps"] == out["steps"]
    assert back["timeline"] == out["timeline"]

    result.check = _check()
    checked = result.to_json()
    assert list(checked)[-1] == "check"
    assert checked["check"]["passed"] is True and checked["check"]["worst"] == {
        "grads": "fc.weight"
    }
    assert json.loads(json.dumps(checked))["check"]["reference_losses"] == [2.5, 2.25, 2.0]


def test_a_run_result_made_directly_has_its_defaults() -> None:
    result = RunResult(ranks=1, stages={0: [0]}, weights={0: ["init"]}, steps=[], timeline=[])
    assert result.to_json() == {
        "ranks": 1,
        "stages": {0: [0]},
        "weights": {0: ["init"]},
        "steps": [],
        "restarts": 0,
        "resumed_from": 0,
        "timeline": [],
        "notes": [],
    }


def test_the_ranks_notes_are_said_once_each_in_order() -> None:
    ranks = _two_ranks()
    ranks[0].notes = ["resuming with the learning rate given now, 0.1 (the checkpoint's had 1)"]
    ranks[1].notes = [*ranks[0].notes, "another"]
    assert summarize(ranks, steps=3).notes == [*ranks[0].notes, "another"]


def test_no_steps_give_no_rows() -> None:
    assert summarize(_two_ranks(), steps=0).steps == []
