"""`pipeline.cli.run`: ``pipepart run``'s flags become one frozen `RunOptions` (with its
`PipelineOptions`) and the plan to run, before any process starts."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from typing import Any

import pytest

import pipeline.launch.run
from partition.errors import PipepartError
from partition.memory import MemoryModel
from partition.microbatch import DEFAULT_MICROBATCHES
from partition.options import PlanOptions
from partition.plan import Plan
from partition.schedules.names import DEFAULT_SCHEDULE
from pipeline.cli.command import _parser, main
from pipeline.cli.run import run_options
from pipeline.launch.options import RunOptions
from pipeline.runtime.options import PipelineOptions

MARKED = "tests.partition.test_markers:marked"  # a model with 3 pipe_split() markers


def _args(*argv: str) -> argparse.Namespace:
    return _parser().parse_args(["run", *argv])


def test_no_flags_run_as_run_pipeline_does_but_three_steps() -> None:
    """One default per knob: the command's are `RunOptions`', `PipelineOptions`' and
    `PlanOptions`' own, but for 3 steps; with no plan, the default schedule and micro-batches are
    named, and the launcher plans for the run's optimizer (SGD), not the planner's default."""
    options, plan = run_options(_args("gpt"))
    assert plan is None
    assert options == RunOptions(
        steps=3,
        pipeline=PipelineOptions(
            schedule=DEFAULT_SCHEDULE,
            microbatches=DEFAULT_MICROBATCHES,
            planning=PlanOptions(memory=MemoryModel(optimizer="sgd")),
        ),
    )


def test_the_planning_flags_reach_the_plan_the_launcher_makes() -> None:
    """Issue 18, item 3: ``run`` dropped ``--trace`` and ``--leaf``; a model that plans only
    with ``--leaf`` could not run."""
    options, _ = run_options(_args("gpt", "--trace", "fx", "--leaf", "h.*", "--optimizer", "adam"))
    planning = options.pipeline.planning
    assert planning is not None
    assert planning.method == "fx" and planning.leaf_modules == ("h.*",)
    assert planning.memory == MemoryModel(optimizer="adam")


def test_every_flag_reaches_its_field() -> None:
    args = _args(
        "gpt",
        *("--size", "small", "--batch", "16", "--seq", "32"),
        *("--ranks", "4", "--steps", "7", "--timeout", "12.5"),
        *("--schedule", "interleaved", "--virtual", "2", "--microbatches", "8"),
        *("--check", "--check-tol", "0.01"),
        *("--weights", "init", "--checkpoint", "w.safetensors"),
        *("--checkpoint-dir", "ckpt", "--checkpoint-every", "5", "--keep", "2"),
        *("--resume", "--restarts", "3"),
        *("--seed", "9", "--lr", "0.5", "--optimizer", "adam", "--loss", "sum"),
        *("--clip", "1.5", "--recompute", "--batchnorm", "batch"),
        *("--on-nonfinite", "skip"),
    )
    options, plan = run_options(args)
    assert plan is None
    assert options == RunOptions(
        ranks=4,
        steps=7,
        optimizer="adam",
        lr=0.5,
        check=True,
        check_tol=0.01,
        timeout=12.5,
        size="small",
        batch=16,
        seq=32,
        pipeline=PipelineOptions(
            schedule="interleaved",
            microbatches=8,
            virtual=2,
            planning=PlanOptions(
                schedule="interleaved",
                microbatches=8,
                virtual=2,
                memory=MemoryModel(optimizer="adam"),
            ),
            seed=9,
            loss_reduction="sum",
            max_grad_norm=1.5,
            on_nonfinite="skip",
            recompute=True,
            batchnorm="batch",
            weights="init",
            checkpoint="w.safetensors",
        ),
        checkpoint_dir="ckpt",
        checkpoint_every=5,
        keep=2,
        resume=True,
        restarts=3,
    )


def test_a_plan_file_keeps_its_schedule_and_micro_batches() -> None:
    """The plan's, not the defaults: they are left ``None`` for the ranks to read from it."""
    options, plan = run_options(_args("gpt", "--plan", "p.json"))
    assert plan == "p.json"
    assert (options.pipeline.schedule, options.pipeline.microbatches) == (None, None)
    options, _ = run_options(_args("gpt", "--plan", "p.json", "--microbatches", "8"))
    assert options.pipeline.microbatches == 8  # given: passed on (the ranks check it)


def test_markers_make_the_plan_here() -> None:
    args = _args(MARKED, "--ranks", "4", "--cuts", "markers", "--microbatches", "2")
    options, plan = run_options(args)
    assert isinstance(plan, Plan)
    assert (plan.algorithm, plan.num_stages, plan.microbatches) == ("markers", 4, 2)
    assert plan.schedule == DEFAULT_SCHEDULE
    assert (options.pipeline.schedule, options.pipeline.microbatches) == (None, None)
    # --optimizer is the run's (adamw here): the plan budgets no optimizer state of its own
    options, plan = run_options(
        _args(MARKED, "--ranks", "4", "--cuts", "markers", "--optimizer", "adamw")
    )
    assert isinstance(plan, Plan) and options.optimizer == "adamw"
    assert plan.memory_model == MemoryModel()  # not the planner's --optimizer flag


def test_markers_and_a_plan_file_are_refused() -> None:
    with pytest.raises(
        PipepartError, match="--cuts markers makes the plan itself; leave out --plan"
    ):
        run_options(_args(MARKED, "--cuts", "markers", "--plan", "p.json"))


def test_args_are_read_never_changed_and_the_options_are_frozen() -> None:
    args = _args("gpt", "--schedule", "gpipe")
    before = copy.deepcopy(vars(args))
    options, _ = run_options(args)
    assert vars(args) == before and args.microbatches is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.steps = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--steps", "0"], "steps must be at least 1, got 0"),
        (["--lr", "-1"], "lr must be positive, got -1.0"),
        (["--resume"], "resume need checkpoint_dir (--checkpoint-dir DIR)"),
        (
            ["--keep", "2", "--checkpoint-dir", "c", "--checkpoint-every", "0"],
            "checkpoint_every must be at least 1, got 0",
        ),
        (["--cuts", "markers", "--plan", "p.json"], "--cuts markers makes the plan itself"),
        # issue 19: the ranks are the mesh's, pp x dp
        (
            ["--ranks", "5", "--pp", "2"],
            "--ranks 5 is not --pp 2 pipeline ranks x --dp 1 replicas; launch --ranks 2",
        ),
        (
            ["--ranks", "4", "--pp", "2", "--dp", "3"],
            "--ranks 4 is not --pp 2 pipeline ranks x --dp 3",
        ),
        (["--ranks", "4", "--dp", "3"], "--ranks 4 do not split into --dp 3 replicas"),
        (["--accumulate", "0"], "accumulate must be at least 1, got 0"),
    ],
)
def test_a_bad_flag_fails_in_one_line_before_any_process_starts(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    flags: list[str],
    message: str,
) -> None:
    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("run_pipeline called")

    monkeypatch.setattr(pipeline.launch.run, "run_pipeline", never)
    assert main(["run", "gpt", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pipepart run: error: ") and err.count("\n") == 1
    assert message in err, err


def test_run_pipeline_gets_the_options_and_the_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    got: list[Any] = []

    def capture(model: Any, options: Any, *, plan: Any = None) -> Any:
        got.append((model, options, plan))
        raise PipepartError("stop here")  # the result is not what this test reads

    monkeypatch.setattr(pipeline.launch.run, "run_pipeline", capture)
    assert main(["run", "gpt", "--ranks", "3", "--plan", "p.json"]) == 2
    assert got == [
        ("gpt", run_options(_args("gpt", "--ranks", "3", "--plan", "p.json"))[0], "p.json")
    ]


def test_the_mesh_flags_reach_their_fields() -> None:
    """Issue 19: ``--pp`` and ``--dp`` lay the ranks out, either one from the other."""
    options, _ = run_options(_args("gpt", "--ranks", "4", "--pp", "2", "--accumulate", "3"))
    assert (options.pp, options.pipeline.dp, options.accumulate) == (2, 2, 3)
    options, _ = run_options(_args("gpt", "--ranks", "6", "--dp", "3"))
    assert (options.pp, options.pp_ranks, options.pipeline.dp) == (None, 2, 3)
    options, _ = run_options(_args("gpt", "--ranks", "4"))
    assert (options.pp_ranks, options.pipeline.dp, options.accumulate) == (4, None, 1)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_replicas_with_accumulation_pass_the_check_on_the_global_batch(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``pipepart run --pp 2 --dp 2 --accumulate 2 --check``: 4 processes, each step's loss that
    of the whole batch (both replicas, both accumulated steps), and every gradient and parameter
    those of one process trained on it."""
    flags = ["--size", "toy", "--ranks", "4", "--pp", "2", "--dp", "2", "--accumulate", "2"]
    flags += ["--batch", "8", "--microbatches", "2", "--steps", "2", "--check", "--json"]
    assert main(["run", "gpt", *flags]) == 0
    out = json.loads(capsys.readouterr().out)
    check = out["check"]
    assert check["passed"] and check["failures"] == []
    assert check["losses"] == pytest.approx(check["reference_losses"], rel=1e-5)
    assert sorted(out["stages"]) == ["0", "1", "2", "3"]  # every global rank reports
    assert out["stages"]["0"] == out["stages"]["2"] == [0]  # replica 1 holds stage 0 on rank 2
    assert any("each of the 2 replicas keeps its own" in note for note in out["notes"])
    assert out["notes"][0] == "modes: one graph serves train and eval mode"  # as plan says
