"""A rank's layout from a plan: the plan's cuts in the plan's node order, nothing costed or
solved; without a plan, one rank plans and the others receive it (see [Note: one plan, made
once] in `pipeline.runtime.layout`)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from harness import run_ranks

import partition.algorithms.optimal
import partition.planning.analysis
import partition.solve
from partition import plan_model
from partition.devices import parse_devices
from partition.errors import PlanError
from partition.models import examples
from partition.models.registry import build_meta_model
from partition.plan import Plan
from pipeline.launch.job import RankJob
from pipeline.launch.options import RunOptions
from pipeline.runtime import Pipeline, PipelineOptions
from pipeline.runtime.layout import layout


def _refuse_planning(setattr_: Callable[[Any, str, Any], None]) -> None:
    """Make costing and every route to the solver raise in this process."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a rank given a plan costed or solved the model")

    setattr_(partition.planning.analysis, "cost_model", refuse)
    setattr_(partition.planning.analysis, "solve", refuse)
    setattr_(partition.solve, "solve", refuse)
    setattr_(partition.algorithms.optimal, "optimal_split", refuse)
    setattr_(partition.solve, "_RUN", {})


def _factory() -> Any:
    return examples.gpt("toy", batch=4)


def _train_one_step(plan: Plan | None, refuse_on: tuple[int, ...]) -> tuple[int, list[str], bool]:
    """On a rank: refuse planning if this rank is in ``refuse_on``, build, train one step."""
    import torch.distributed as dist

    if dist.get_rank() in refuse_on:
        _refuse_planning(setattr)
    pipe = Pipeline(_factory, plan=plan, options=PipelineOptions(microbatches=2))
    inputs, target = _batch()
    loss = pipe.step(inputs, target)
    cuts = [pipe.stages[s].nodes[-1] for s in range(len(pipe.stages) - 1)]
    return pipe.rank, cuts, loss is None or bool(torch.isfinite(loss))


def _batch() -> tuple[Any, Any]:
    _, (idx,), _ = examples.gpt("toy", batch=4)
    target = torch.roll(idx, -1, dims=1)
    return (idx,), target


def test_ranks_given_a_plan_never_solve() -> None:
    built = build_meta_model(_factory)
    plan = plan_model(built.model, built.args, devices=parse_devices("cpu", 2), microbatches=2)
    results = run_ranks(2, _train_one_step, plan, (0, 1))
    assert [r[0] for r in results] == [0, 1] and all(ok for _, _, ok in results)
    assert results[0][1] == results[1][1] == [s.last_node for s in plan.stages[:-1]]


def test_without_a_plan_only_the_first_rank_plans() -> None:
    results = run_ranks(2, _train_one_step, None, (1,))  # rank 1 cannot plan: it must receive
    assert results[0][1] == results[1][1] and all(ok for _, _, ok in results)
    built = build_meta_model(_factory)  # the plan rank 0 made is plan_model's own
    plan = plan_model(built.model, built.args, devices=parse_devices("cpu", 2), microbatches=2)
    assert results[0][1] == [s.last_node for s in plan.stages[:-1]]


def test_a_plan_that_fails_on_the_first_rank_fails_every_rank_alike() -> None:
    outcomes = run_ranks(2, _infeasible, expect_failure=True)
    assert all(not o.ok for o in outcomes)
    assert {o.error_types[0] for o in outcomes} == {"PlanError"}
    assert "are not a split of the" in outcomes[1].message
    assert outcomes[0].message == outcomes[1].message


def _infeasible() -> None:
    Pipeline(
        _factory,
        options=PipelineOptions(microbatches=2, bounds=(0, 1, 2)),  # not a split of the nodes
    )


def test_run_pipeline_plans_once_and_hands_the_plan_to_every_rank(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pipeline.launch.run as launch

    jobs: list[Any] = []

    def fake_spawn(fn: Any, ranks: int, args: tuple[Any, ...], **kw: Any) -> list[Any]:
        jobs.extend(args)
        raise _Stop

    monkeypatch.setattr(launch, "spawn_ranks", fake_spawn)
    with pytest.raises(_Stop):
        launch.run_pipeline(
            "gpt", RunOptions(ranks=2, size="toy", pipeline=PipelineOptions(microbatches=2))
        )
    (job,) = jobs
    assert isinstance(job, RankJob) and job.plan is not None
    assert job.plan.num_ranks == 2 and job.plan.microbatches == 2


class _Stop(Exception):
    pass


@pytest.mark.parametrize(("order", "method"), [("graph", "fx"), ("late", "fx"), ("auto", "export")])
def test_a_rank_given_a_plan_cuts_without_costing(
    monkeypatch: pytest.MonkeyPatch, order: str, method: str
) -> None:
    built = build_meta_model(functools.partial(examples.gpt, "toy", batch=4))
    plan = plan_model(
        built.model,
        built.args,
        devices=parse_devices("cpu", 3),
        microbatches=2,
        order=order,
        method=method,
    )
    planned = [
        (s.index, s.first_node, s.last_node) for s in plan.stages
    ]  # what the plan file says each stage runs

    _refuse_planning(monkeypatch.setattr)
    laid_out = layout(built, plan, PipelineOptions(), 3)
    stages, schedule = laid_out.stages, laid_out.schedule
    assert laid_out.plan is plan
    assert [(i, s.nodes[0], s.nodes[-1]) for i, s in enumerate(stages)] == planned
    assert schedule.num_microbatches == 2 and schedule.name == plan.schedule


def test_a_plan_in_an_unknown_order_is_refused() -> None:
    built = build_meta_model(functools.partial(examples.gpt, "toy", batch=4))
    plan = plan_model(built.model, built.args, devices=parse_devices("cpu", 2), microbatches=2)
    bad = plan.__class__.from_dict(
        {**plan.to_dict(), "model": {**plan.to_dict()["model"], "order": "auto"}}
    )
    with pytest.raises(PlanError, match="node order is 'graph' or 'late'"):
        layout(built, bad, PipelineOptions(), 2)


class _TrainBranch(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h * 2 if self.training else h)


def _eval_factory() -> Any:
    return _TrainBranch().eval(), (torch.randn(4, 4),), torch.nn.functional.mse_loss


def test_a_plan_of_one_mode_is_laid_out_in_that_mode_and_refuses_the_other() -> None:
    from partition.modes.modal import stage_module

    built = build_meta_model(_eval_factory)
    plan = plan_model(
        built.model, built.args, devices=parse_devices("cpu", 2), microbatches=2, modes="eval"
    )
    assert Plan.from_dict(plan.to_dict()).model.modes == ("eval",) == plan.model.modes
    stages = layout(built, plan, PipelineOptions(), 2).stages
    assert stage_module(stages[0], False) is stages[0].module
    with pytest.raises(PlanError, match=r"cannot run in train mode .*--modes both"):
        stage_module(stages[0], True)
    with pytest.raises(PlanError, match=r"the plan traced eval mode, .* --modes both"):
        layout(built, plan, PipelineOptions(modes="both"), 2)
    both = plan_model(built.model, built.args, devices=parse_devices("cpu", 2), microbatches=2)
    assert both.model.modes == ("eval", "train")
    assert stage_module(layout(built, both, PipelineOptions(), 2).stages[1], True) is not None
