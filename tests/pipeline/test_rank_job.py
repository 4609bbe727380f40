"""One rank's job (`pipeline.launch.job`): a `RankJob` crosses a process boundary whole (plan
included), and `run_rank` on 2 gloo ranks trains ``steps`` steps whose losses, parameters and
gradients are those of the plain model trained the plain way in this process (float64), and
resumes from its own checkpoints reporting every step."""

from __future__ import annotations

import dataclasses
import math
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from harness import run_ranks
from torch import Tensor, nn

from partition import plan_model
from partition.devices import parse_devices
from partition.models.registry import build_meta_model
from partition.plan import Plan
from pipeline.launch.job import RankJob, RankResult, run_rank
from pipeline.launch.options import Checkpoints
from pipeline.runtime.optim import OptimizerFactory
from pipeline.runtime.options import PipelineOptions

BATCH, M, LR = 8, 2, 0.1


def mlp() -> Any:
    """A float64 MLP, its example batch and an MSE loss (module level: the ranks import it)."""
    model = nn.Sequential(
        nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)
    ).double()
    return model, (torch.zeros(BATCH, 4, dtype=torch.float64),), F.mse_loss


def _batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 4, generator=g, dtype=torch.float64)
    return x, torch.randn(BATCH, 3, generator=g, dtype=torch.float64)


def _plan() -> Plan:
    """Nodes (input, linear, tanh | linear, tanh, linear): both ranks hold parameters (the
    partitioner would leave rank 0 only the input of a model this small)."""
    built = build_meta_model(mlp)
    devices = parse_devices("cpu", 2)
    return plan_model(built.model, built.args, devices=devices, microbatches=M, bounds=(0, 3, 6))


def _job(steps: int, plan: Plan | None = None, **kw: Any) -> RankJob:
    x, y = _batch()
    return RankJob(
        factory=mlp,
        plan=plan if plan is not None else _plan(),
        pipeline=PipelineOptions(microbatches=M),
        optimizer=OptimizerFactory("sgd", LR),
        steps=steps,
        batch=((x,), y),
        **kw,
    )


def _plain(steps: int) -> tuple[list[float], dict[str, Tensor], dict[str, Tensor]]:
    """The model as the factory builds it under the pipeline's seed (0), trained the plain way
    on the whole batch: each step's loss, then its parameters and last gradients."""
    torch.manual_seed(0)
    model = mlp()[0]
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = _batch()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    params = {n: p.detach() for n, p in model.named_parameters()}
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return losses, params, grads


def test_a_job_with_a_plan_survives_pickling() -> None:
    job = _job(3, collect=True, checkpoints=Checkpoints(root="ckpt", every=2, keep=1))
    back = pickle.loads(pickle.dumps(job))
    assert back.plan is not None and job.plan is not None
    assert back.plan.to_dict() == job.plan.to_dict()
    assert back.plan.num_ranks == 2 and back.plan.microbatches == M
    assert back.factory is mlp
    assert (back.pipeline, back.optimizer, back.steps, back.collect, back.checkpoints) == (
        job.pipeline,
        job.optimizer,
        3,
        True,
        Checkpoints(root="ckpt", every=2, keep=1),
    )
    (x,), y = back.batch
    assert torch.equal(x, job.batch[0][0]) and torch.equal(y, job.batch[1])
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.steps = 4  # type: ignore[misc]


def _compute(timeline: list[tuple[int, str, float, float]]) -> set[str]:
    return {a for _, a, _, _ in timeline if re.fullmatch(r"\d+[FB]\d+", a)}


def test_run_rank_trains_like_the_plain_model() -> None:
    steps = 3
    results: list[RankResult] = run_ranks(2, run_rank, _job(steps, collect=True), timeout=120)
    losses, params, grads = _plain(steps)

    first, last = results
    assert (first.rank, first.stages, last.rank, last.stages) == (0, [0], 1, [1])
    assert first.microbatches == last.microbatches == M
    assert first.losses == [None] * steps  # the loss is on the last stage's rank
    assert last.losses == pytest.approx(losses, rel=1e-12, abs=0)
    assert len(set(losses)) == steps  # the steps did train
    for r in results:
        assert r.weights == ["factory"] and r.resumed_from == 0
        assert len(r.times) == steps and all(t > 0 for t in r.times)
        assert len(r.timelines) == steps
        for timeline in r.timelines:
            assert {rank for rank, *_ in timeline} == {r.rank}
            assert all(start <= end for _, _, start, end in timeline)
            s = r.rank
            assert _compute(timeline) == {f"{s}F0", f"{s}F1", f"{s}B0", f"{s}B1"}

    got_params = {**first.params, **last.params}
    got_grads = {**first.grads, **last.grads}
    assert set(got_params) == set(params) and set(got_grads) == set(grads)
    assert set(first.params) == {"0.weight", "0.bias"}  # each rank sends only its own
    assert set(last.params) == {"2.weight", "2.bias", "4.weight", "4.bias"}
    for name in params:
        torch.testing.assert_close(got_params[name], params[name], rtol=1e-12, atol=0)
        torch.testing.assert_close(got_grads[name], grads[name], rtol=1e-12, atol=1e-15)


@pytest.mark.slow
def test_run_rank_resumes_from_its_checkpoint_reporting_every_step(tmp_path: Path) -> None:
    """2 steps saving after each (keep 1), then a job of 4 steps resuming: it starts at step 2,
    reports the losses of steps 0 and 1 from the checkpoint and no time for them, and its
    losses are the plain model's 4."""
    plan = _plan()
    root = str(tmp_path / "ckpt")
    saving = _job(2, plan, checkpoints=Checkpoints(root=root, every=1, keep=1))
    run_ranks(2, run_rank, saving, timeout=120)
    assert sorted(p.name for p in Path(root).iterdir()) == ["step-00000002"]

    resuming = _job(4, plan, checkpoints=Checkpoints(root=root, resume=True))
    first, last = run_ranks(2, run_rank, resuming, timeout=120)
    losses, _, _ = _plain(4)
    assert first.resumed_from == last.resumed_from == 2
    assert first.losses == [None] * 4
    assert last.losses == pytest.approx(losses, rel=1e-12, abs=0)
    for r in (first, last):
        assert r.weights == ["factory"]  # what it built before loading the checkpoint
        assert all(math.isnan(t) for t in r.times[:2]) and all(t > 0 for t in r.times[2:])
        assert r.timelines[:2] == [[], []] and all(r.timelines[2:])
