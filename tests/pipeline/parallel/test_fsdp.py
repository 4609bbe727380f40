"""Sharded replicas (``dp_reduce="fsdp"``, issue 19) against one process on the global batch:
loss, every gradient (gathered from its shards) and the parameters after three optimizer steps, for
GPipe, 1F1B and ZB-H1, mean and sum losses, with and without accumulation over steps, a weight
tied across the pipeline and one tied within a stage, clipping, on 4 gloo ranks as pp=2 × dp=2
and pp=1 × dp=4. The cases and the reference are `test_data_parallel`'s.

A gradient reduce-scattered twice is divided twice (or, summed, doubled), one never reduced is
one replica's shard's: both fail the comparison; `test_each_stage_reduces_once_per_optimizer_step`
also counts the reduce-scatters themselves.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from harness import run_ranks
from test_data_parallel import STEPS, Case, _compare
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from partition.errors import PlanError
from pipeline.cli.command import main
from pipeline.parallel.data import global_loss, shard
from pipeline.parallel.fsdp import full
from pipeline.runtime.pipeline import Pipeline, PipelineOptions

CASES = [
    Case("skipnet", "gpipe", dp_reduce="fsdp"),
    Case("skipnet", "1f1b", accumulate=2, dp_reduce="fsdp"),
    Case("skipnet", "1f1b", accumulate=2, reduction="sum", dp_reduce="fsdp"),
    Case("skipnet", "zb-h1", accumulate=2, dp_reduce="fsdp"),
    Case("skipnet", "interleaved", virtual=2, dp_reduce="fsdp"),  # 2 FSDP units per rank
    Case("skipnet", "gpipe", reduction="sum", user_mesh=True, dp_reduce="fsdp"),
    Case("gpt-tied", "1f1b", accumulate=2, max_grad_norm=0.05, dp_reduce="fsdp"),  # tied over pp
    Case("gpt-tied", "zb-h1", dp_reduce="fsdp"),
    Case("skipnet", "1f1b", dp=4, accumulate=2, dp_reduce="fsdp"),  # pp=1 × dp=4
    Case("skipnet", "gpipe", dp=4, reduction="sum", dp_reduce="fsdp"),
    Case("gpt-tied", "1f1b", dp=4, max_grad_norm=0.05, dp_reduce="fsdp"),  # tied in one stage
]


class _Dropout(nn.Module):
    """Reads ``self.training`` in its forward: traced in both modes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.dropout(torch.tanh(self.fc1(x)), 0.5, self.training))


def _modal() -> Any:
    return _Dropout(), (torch.randn(4, 16),), F.mse_loss


# --- on the ranks ------------------------------------------------------------------------------


def _train(cases: list[Case]) -> list[dict[str, Any]]:
    results = []
    for case in cases:
        mesh = None
        if case.user_mesh:
            from torch.distributed.device_mesh import init_device_mesh

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
                grads = {n: full(p.grad).clone() for n, p in pipe.named_parameters().items()}
        params = {n: full(p.detach()).clone() for n, p in pipe.named_parameters().items()}
        place = (dist.get_rank(), pipe.replica, pipe.rank)
        results.append(
            {"losses": losses, "grads": grads, "params": params, "dp": pipe.dp, "place": place}
        )
        dist.barrier()
    return results


def _counted(case: Case) -> dict[str, Any]:
    """Counts each step's reduce-scatters and all-gathers (FSDP2 makes them through
    ``dist.reduce_scatter_single`` and ``dist.all_gather_single``), then looks at what is
    sharded, and evaluates between two steps."""
    calls: list[str] = []
    originals = {n: getattr(dist, n) for n in ("reduce_scatter_single", "all_gather_single")}

    def counting(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return originals[name](*args, **kwargs)

        return call

    for name in originals:
        setattr(dist, name, counting(name))
    try:
        pipe = Pipeline(case.factory(), options=case.options(), optimizer_factory=case.optimizer())
        per_step = []
        batches = case.batches()
        for batch in batches:
            for k in range(case.accumulate):
                before = len(calls)
                x, y = shard(batch, k * pipe.dp + pipe.replica, case.accumulate * pipe.dp)
                pipe.step(x, y, accumulate=k < case.accumulate - 1)
                got = calls[before:]
                per_step.append(
                    (got.count("reduce_scatter_single"), got.count("all_gather_single"))
                )
        x, y = shard(batches[0], pipe.replica, case.accumulate * pipe.dp)
        evaluated = pipe.evaluate(x, y)
        before = len(calls)
        stepped = pipe.step(x, y)  # the loss at the same weights
        after_eval = calls[before:].count("reduce_scatter_single")
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    params = pipe.parameters
    cleared = _zero_grad_mid_accumulation(case)
    state = [pipe.optimizer.state[p]["momentum_buffer"] for p in params]  # type: ignore[union-attr]
    modules = [pipe.executors[s].module for s in pipe.my_stages]
    return {
        "stages": len(pipe.my_stages),
        "per_step": per_step,
        "after_eval": after_eval,
        "losses": None if evaluated is None else (float(evaluated), float(stepped)),
        "sharded": all(
            isinstance(p, DTensor) and p.placements == (Shard(0),) and p.device_mesh.size() == 2
            for p in params
        ),
        "state_sharded": all(
            isinstance(m, DTensor) and m.to_local().shape == p.to_local().shape
            for m, p in zip(state, params, strict=True)
        ),
        "cleared": cleared,
        "resharded": all(isinstance(p, DTensor) for m in modules for p in m.parameters()),
        "local": sum(p.to_local().numel() for p in params),
        "whole": sum(p.numel() for p in params),
    }


def _zero_grad_mid_accumulation(case: Case) -> bool:
    """``zero_grad`` after an accumulating step drops the gradients gathered so far, too: the
    next step's are those of that step alone (no optimizer: the weights stay)."""
    pipe = Pipeline(case.factory(), options=case.options())
    x, y = shard(case.batches()[0], pipe.replica, pipe.dp * case.accumulate)
    pipe.step(x, y)
    alone = {n: full(p.grad).clone() for n, p in pipe.named_parameters().items()}
    pipe.step(3 * x, y, accumulate=True)
    pipe.zero_grad()
    pipe.step(x, y)
    grads = {n: full(p.grad) for n, p in pipe.named_parameters().items()}
    return all(torch.equal(g, alone[n]) for n, g in grads.items())


def _refusals() -> dict[str, str]:
    """What sharding cannot run, on 2 ranks as pp=1 × dp=2: each refusal's message."""
    out: dict[str, str] = {}
    options = PipelineOptions(microbatches=2, dp=2, dp_reduce="fsdp")
    try:
        Pipeline(_modal, options=options)
    except PlanError as e:
        out["modes"] = str(e)
    trained = dataclasses.replace(options, modes="train")  # the training graph only: it runs
    pipe = Pipeline(_modal, options=trained)
    pipe.step(torch.randn(4, 16), torch.randn(4, 16))
    out["save"] = pipe.save(tempfile.mkdtemp()).name  # no longer refused: test_checkpoint_fsdp
    tied = Case("gpt-tied", "interleaved", dp=2, virtual=2, dp_reduce="fsdp")
    try:
        Pipeline(tied.factory(), options=dataclasses.replace(tied.options(), bounds=None))
    except PlanError as e:
        out["tied"] = str(e)
    return out


# --- in the test process -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sharded_replicas_match_one_process_on_the_global_batch() -> None:
    results = run_ranks(4, _train, CASES, timeout=280)
    for i, case in enumerate(CASES):
        _compare(case, [r[i] for r in results])


@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_each_stage_reduces_once_per_optimizer_step(schedule: str) -> None:
    """One reduce-scatter and one all-gather per stage per optimizer step: none on an
    accumulating step, one on the step that steps (the gathered weights kept over every
    micro-batch and both accumulated steps); the weights, their gradients and the optimizer's
    state sharded over the 2 replicas, and back to shards after each step."""
    case = Case("skipnet", schedule, accumulate=2, dp_reduce="fsdp")
    for rank in run_ranks(4, _counted, case, timeout=180):
        n = rank["stages"]
        assert rank["per_step"] == [(0, n), (n, 0)] * STEPS, rank
        assert rank["after_eval"] == n  # evaluate between steps leaves the next one whole
        assert rank["sharded"] and rank["state_sharded"] and rank["resharded"], rank
        assert rank["cleared"], "zero_grad left gathered gradients behind"
        assert rank["local"] <= rank["whole"] // 2 + 16  # half, give or take a padded row
        if rank["losses"] is not None:
            evaluated, stepped = rank["losses"]
            assert evaluated == pytest.approx(stepped, rel=1e-12, abs=1e-12)


def test_options_refuse_what_sharding_cannot_run() -> None:
    with pytest.raises(PlanError, match="dp_reduce must be 'ddp' or 'fsdp', got 'zero'"):
        PipelineOptions(dp_reduce="zero")  # type: ignore[arg-type]
    with pytest.raises(PlanError, match="use batchnorm='microbatch'"):
        PipelineOptions(dp=2, dp_reduce="fsdp", batchnorm="batch")


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_what_cannot_run_sharded_is_refused_saying_what_to_change() -> None:
    for rank in run_ranks(2, _refusals, timeout=180):
        assert "trace the training mode only (PipelineOptions(modes='train')" in rank["modes"]
        assert rank["save"] == "step-00000001"
        assert "stages 0 and 1 of one rank share a parameter" in rank["tied"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_pipepart_run_with_sharded_replicas_passes_the_check(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``pipepart run gpt --ranks 4 --pp 2 --dp 2 --dp-reduce fsdp --check``: the gathered
    gradients and weights of every rank are those of one process on the global batch."""
    flags = ["--size", "toy", "--ranks", "4", "--pp", "2", "--dp", "2", "--dp-reduce", "fsdp"]
    flags += ["--accumulate", "2", "--batch", "16", "--steps", "2", "--check", "--json"]
    assert main(["run", "gpt", *flags]) == 0
    check = json.loads(capsys.readouterr().out)["check"]
    assert check["passed"] and check["failures"] == []
    assert check["losses"] == pytest.approx(check["reference_losses"], rel=1e-5)
