"""One rank's executor running a schedule's actions, against the model run whole (float64).

A one-rank process group in this process holds every stage, so the executor hands tensors from
stage to stage with no message: what is tested is the running of actions — their order, the
inbox and outbox between stages, the results, the timeline, and errors that say where.
"""

from __future__ import annotations

import copy
import functools
import itertools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from partition import analyze
from partition.errors import StageError
from partition.schedules.actions import Kind, Schedule, build_schedule, with_communication
from partition.split import Stage, split
from pipeline.runtime.executor import RankExecutor
from pipeline.runtime.stage import StageExecutor

D, M, B = 4, 4, 2  # width, micro-batches, rows per micro-batch
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_rank")

ZERO_BUBBLE = Schedule.from_text(
    # I of stage 1 before the F of later micro-batches, every W as late as possible
    "0F0 1F0 1I0 0I0 0F1 1F1 1I1 0I1 1W0 0W0 0F2 1F2 1I2 0I2 0F3 1F3 1I3 0I3 "
    "1W1 0W1 1W2 0W2 1W3 0W3",
    name="one-rank zero-bubble",
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(D, D), nn.Tanh(), nn.Linear(D, D), nn.Tanh(), nn.Linear(D, D)
    ).double()


def _stages(model: nn.Module, k: int) -> list[Stage]:
    analysis = analyze(model, (torch.randn(B, D, dtype=torch.float64),))
    n = len(analysis.graph)
    return split(analysis.traced, analysis.graph, [round(i * n / k) for i in range(k + 1)])


def _executor(stages: list[Stage], schedule: Schedule, loss_fn: Any = F.mse_loss) -> RankExecutor:
    last = len(stages) - 1
    executors = {
        s.index: StageExecutor(
            s, loss_fn=loss_fn if s.index == last else None, loss_scale=1.0 / M, device=CPU
        )
        for s in stages
    }
    return RankExecutor(stages, schedule, executors, rank=0, device=CPU, link_groups=False)


def _batch() -> tuple[list[list[Tensor]], list[Tensor], Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M * B, D, generator=g, dtype=torch.float64)
    y = torch.randn(M * B, D, generator=g, dtype=torch.float64)
    return [[c] for c in x.tensor_split(M)], list(y.tensor_split(M)), x, y


@pytest.mark.parametrize(
    "schedule", [build_schedule("interleaved", 1, M, 2), ZERO_BUBBLE], ids=["interleaved", "zb"]
)
def test_a_step_equals_the_whole_batch_in_one_process(schedule: Schedule) -> None:
    model = _model()
    reference = copy.deepcopy(model)
    rank_executor = _executor(_stages(model, schedule.num_stages), schedule)
    mb_inputs, mb_targets, x, y = _batch()
    actions = with_communication(schedule).actions[0]
    results, timeline = rank_executor.run(actions, mb_inputs, mb_targets, train=True)
    assert results == {}  # training returns no outputs
    F.mse_loss(reference(x), y).backward()
    losses = rank_executor.executors[schedule.num_stages - 1].losses
    torch.testing.assert_close(
        torch.stack(losses).mean(), F.mse_loss(reference(x), y).detach(), rtol=1e-12, atol=0
    )
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-15, msg=name)
    assert [a for _, a, _, _ in timeline] == list(actions)
    assert all(r == 0 and start <= end for r, _, start, end in timeline)
    assert all(e[3] <= f[2] for e, f in itertools.pairwise(timeline))
    assert not any(e._saved for e in rank_executor.executors.values())  # every backward ran


def test_evaluation_returns_each_micro_batchs_output() -> None:
    model = _model()
    schedule = build_schedule("interleaved", 1, M, 2)
    rank_executor = _executor(_stages(model, 2), schedule)
    mb_inputs, _, x, _ = _batch()
    forward = [a for a in with_communication(schedule).actions[0] if a.kind is Kind.F]
    results, _ = rank_executor.run(forward, mb_inputs, None, train=False)
    with torch.no_grad():
        expected = model(x)
    assert sorted(results) == list(range(M))
    torch.testing.assert_close(
        torch.cat([results[i] for i in range(M)]), expected, rtol=1e-12, atol=0
    )
    assert all(p.grad is None for p in model.parameters())


def test_a_failing_action_says_where_and_keeps_its_type() -> None:
    def loss_fn(out: Tensor, target: Tensor) -> Tensor:
        if torch.equal(target, mb_targets[2]):
            raise ZeroDivisionError("the loss of micro-batch 2")
        return F.mse_loss(out, target)

    schedule = build_schedule("interleaved", 1, M, 2)
    rank_executor = _executor(_stages(_model(), 2), schedule, loss_fn)
    mb_inputs, mb_targets, _, _ = _batch()
    actions = with_communication(schedule).actions[0]
    with pytest.raises(ZeroDivisionError) as err:
        rank_executor.run(actions, mb_inputs, mb_targets, train=True, step=5)
    assert isinstance(err.value, StageError)
    assert str(err.value).startswith("[rank 0 · stage 1 · step 5 · 1F2] ZeroDivisionError:")
    assert isinstance(err.value.__cause__, ZeroDivisionError)


def test_what_runs_after_an_action_runs_right_after_it_and_sees_its_gradients() -> None:
    """Issue 19: a gradient reduction starts as soon as its stage's last W ends, mid-schedule
    (the ``after`` hooks `pipeline.parallel.accumulate.GradientSync.hooks` gives)."""
    model = _model()
    rank_executor = _executor(_stages(model, 2), ZERO_BUBBLE)
    actions = with_communication(ZERO_BUBBLE).actions[0]
    last_w = {a.stage: i for i, a in enumerate(actions) if a.kind is Kind.W}
    seen: list[tuple[int, bool]] = []  # (action index, its stage's gradients all there)

    def hook(index: int) -> None:
        stage = rank_executor.executors[actions[index].stage]
        seen.append((index, all(p.grad is not None for p in stage.parameters)))

    after = {i: functools.partial(hook, i) for i in last_w.values()}
    mb_inputs, mb_targets, _, _ = _batch()
    rank_executor.run(actions, mb_inputs, mb_targets, train=True, after=after)
    assert [i for i, _ in seen] == sorted(last_w.values())
    assert seen[0][0] < len(actions) - 1  # stage 1's last W is not the schedule's last action
    assert all(ready for _, ready in seen)
