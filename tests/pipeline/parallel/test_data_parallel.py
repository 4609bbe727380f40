"""Replicas × pipeline against one process on the global batch (issue 19): loss, every gradient
and the parameters after three optimizer steps, for GPipe, 1F1B, ZB-H1 and interleaved 1F1B, mean
and sum losses, with and without accumulation over steps, tied weights and clipping, on 4 gloo
ranks as pp=2 × dp=2 (and pp=1 × dp=4, pp=4 × dp=1). One spawn runs every case in turn, and
first a step whose loss is not finite on one replica only: every replica drops the update.

A gradient reduced twice over the replicas is twice the reference, one never reduced is one
replica's shard's: both fail here, as does a gradient scaled for the wrong number of steps.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from harness import run_ranks
from torch.distributed.device_mesh import init_device_mesh

from partition.models import examples
from partition.models.registry import unpack_model
from pipeline.parallel.data import global_loss, shard
from pipeline.runtime.pipeline import Pipeline, PipelineOptions

NUM_NODES = {"skipnet": 29, "gpt-tied": 117}
STEPS = 3
TOL = 1e-10  # fp64


def _mse_sum(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, target, reduction="sum")


def skipnet_model(batch: int, reduction: str) -> Any:
    model, (x,), _ = examples.skipnet(batch=batch)
    return model.double(), (x.double(),), F.mse_loss if reduction == "mean" else _mse_sum


def gpt_tied_model(batch: int) -> Any:
    model, inputs, loss_fn = examples.gpt("toy", batch=batch, tie_weights=True)
    return model.double(), inputs, loss_fn


@dataclass(frozen=True)
class Case:
    """Replicas of one pipeline, trained ``STEPS`` optimizer steps of ``accumulate`` steps each."""

    model: str  # skipnet | gpt-tied
    schedule: str
    dp: int = 2
    accumulate: int = 1
    reduction: str = "mean"
    virtual: int = 1
    max_grad_norm: float | None = None
    user_mesh: bool = False  # Pipeline(mesh=...) instead of PipelineOptions(dp=...)
    dp_reduce: str = "ddp"  # or "fsdp": test_fsdp.py

    @property
    def pp(self) -> int:
        return 4 // self.dp

    @property
    def microbatches(self) -> int:
        return 2 * self.pp if self.schedule == "interleaved" else max(2, self.pp)

    @property
    def rows(self) -> int:
        """Rows per replica per step."""
        return 2 * self.microbatches

    def factory(self) -> Any:
        if self.model == "gpt-tied":
            return functools.partial(gpt_tied_model, self.rows)
        return functools.partial(skipnet_model, self.rows, self.reduction)

    def options(self) -> PipelineOptions:
        k = self.pp * self.virtual
        n = NUM_NODES[self.model]
        return PipelineOptions(
            schedule=self.schedule,
            microbatches=self.microbatches,
            virtual=self.virtual,
            bounds=tuple(round(i * n / k) for i in range(k + 1)),
            loss_reduction=self.reduction,  # type: ignore[arg-type]
            max_grad_norm=self.max_grad_norm,
            dp=None if self.user_mesh else self.dp,
            dp_reduce=self.dp_reduce,  # type: ignore[arg-type]
        )

    def optimizer(self) -> Any:
        lr = 0.1 if self.reduction == "mean" else 0.1 / (self.rows * self.dp * self.accumulate)
        return functools.partial(torch.optim.SGD, lr=lr, momentum=0.9)

    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One global batch per optimizer step: ``accumulate * dp`` parts of ``rows`` rows."""
        g = torch.Generator().manual_seed(1234)
        rows = self.rows * self.dp * self.accumulate
        out = []
        for _ in range(STEPS):
            if self.model == "gpt-tied":
                x = torch.randint(0, 96, (rows, 16), generator=g)
                y = torch.randint(0, 96, (rows, 16), generator=g)
            else:
                x = torch.randn(rows, 16, generator=g, dtype=torch.float64)
                y = torch.randn(rows, 16, generator=g, dtype=torch.float64)
            out.append((x, y))
        return out


CASES = [
    Case("skipnet", "gpipe"),
    Case("skipnet", "1f1b", accumulate=2),
    Case("skipnet", "1f1b", accumulate=2, reduction="sum"),
    Case("skipnet", "gpipe", reduction="sum", user_mesh=True),
    Case("skipnet", "zb-h1", accumulate=2),
    Case("skipnet", "interleaved", virtual=2),
    Case("gpt-tied", "1f1b", accumulate=2, max_grad_norm=0.05),  # tied across pp, clipped
    Case("skipnet", "1f1b", dp=4, accumulate=2),  # pp=1 × dp=4
    Case("skipnet", "1f1b", dp=1, accumulate=2, reduction="sum"),  # pp=4 × dp=1
]


# --- on the ranks ------------------------------------------------------------------------------


def _train(cases: list[Case]) -> list[dict[str, Any]]:
    results = [_nonfinite_on_one_replica()]
    for case in cases:
        mesh = None
        if case.user_mesh:
            mesh = init_device_mesh("cpu", (case.dp, case.pp), mesh_dim_names=("dp", "pp"))
        pipe = Pipeline(
            case.factory(), options=case.options(), optimizer_factory=case.optimizer(), mesh=mesh
        )
        parts = case.accumulate * pipe.dp
        losses, grads = [], {}
        for step, batch in enumerate(case.batches()):
            mine = []
            for k in range(case.accumulate):
                x, y = shard(batch, k * pipe.dp + pipe.replica, parts)
                mine.append(pipe.step(x, y, accumulate=k < case.accumulate - 1))
            loss = global_loss(pipe, mine)
            losses.append(None if loss is None else float(loss))
            if step == 0:
                grads = {n: p.grad.clone() for n, p in pipe.named_parameters().items()}
        params = {n: p.detach().clone() for n, p in pipe.named_parameters().items()}
        place = (dist.get_rank(), pipe.replica, pipe.rank)
        results.append(
            {"losses": losses, "grads": grads, "params": params, "dp": pipe.dp, "place": place}
        )
        dist.barrier()
    return results


def _nonfinite_on_one_replica() -> dict[str, Any]:
    """Replica 1's shard has an infinite target at step 0: every replica drops that update."""
    case = Case("skipnet", "1f1b")
    options = dataclasses.replace(case.options(), on_nonfinite="skip")
    pipe = Pipeline(case.factory(), options=options, optimizer_factory=case.optimizer())
    before = {n: p.detach().clone() for n, p in pipe.named_parameters().items()}
    x, y = shard(case.batches()[0], pipe.replica, pipe.dp)
    if pipe.replica == 1:
        y = y.clone()
        y[0, 0] = float("inf")
    pipe.step(x, y)
    unchanged = all(torch.equal(p, before[n]) for n, p in pipe.named_parameters().items())
    return {"skipped": list(pipe.nonfinite_steps), "unchanged": unchanged}


# --- in the test process -----------------------------------------------------------------------


def _reference(case: Case) -> dict[str, Any]:
    """The factory's model, one process, the plain way, on each step's global batch."""
    torch.manual_seed(0)
    built = unpack_model(case.factory()())
    model, loss_fn = built.model, built.loss_fn
    assert loss_fn is not None
    opt = case.optimizer()(list(model.parameters()))
    losses, grads = [], {}
    for step, (x, y) in enumerate(case.batches()):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        if case.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), case.max_grad_norm)
            assert norm > case.max_grad_norm  # the case means to exercise clipping
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters(remove_duplicate=False)}
        opt.step()
        losses.append(loss.item())
    params = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    return {"losses": losses, "grads": grads, "params": params}


def _compare(case: Case, ranks: list[dict[str, Any]]) -> None:
    ref = _reference(case)
    assert {r["dp"] for r in ranks} == {case.dp}
    # replica r's stage-rank s on global rank r * pp + s
    assert [r["place"] for r in ranks] == [(g, g // case.pp, g % case.pp) for g in range(4)]
    last = [r for r in ranks if r["losses"][0] is not None]
    assert len(last) == case.dp, f"{case}: one loss per replica"
    for r in last:
        assert r["losses"] == pytest.approx(ref["losses"], abs=TOL, rel=TOL), case
    for what in ("grads", "params"):
        seen: dict[str, int] = {}
        for r in ranks:
            for name, value in r[what].items():
                seen[name] = seen.get(name, 0) + 1
                want = ref[what][name]
                assert torch.isfinite(value).all(), f"{case}: {what[:-1]} {name} is not finite"
                diff = (value - want).abs().max().item()
                scale = max(1.0, want.abs().max().item())
                assert diff <= TOL * scale, f"{case}: {what[:-1]} {name} differs by {diff:.3g}"
        assert set(seen) == set(ref[what]), (
            f"{case}: {what} missing for {set(ref[what]) - set(seen)}"
        )
        assert min(seen.values()) >= case.dp, f"{case}: every replica holds every stage"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_replicas_match_one_process_on_the_global_batch() -> None:
    results = run_ranks(4, _train, CASES, timeout=280)
    assert [r[0] for r in results] == [{"skipped": [0], "unchanged": True}] * 4
    for i, case in enumerate(CASES, start=1):
        _compare(case, [r[i] for r in results])
