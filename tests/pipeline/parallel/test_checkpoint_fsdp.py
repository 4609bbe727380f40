"""Checkpoints of sharded replicas (``dp_reduce="fsdp"``, issue 19): the same files as replicated
replicas, written whole by replica 0. A pp=2 × dp=2 fsdp run stopped, saved and resumed ends
bit-identical to one that never stopped; its checkpoint loads under ddp pp=2 × dp=2 and
pp=1 × dp=2 and under fsdp with bit-equal weights and optimizer state, and a ddp checkpoint loads
sharded; a save in the background writes what one in the caller's thread does; the CLI saves and
resumes under ``--dp-reduce fsdp``."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import run_ranks
from safetensors.torch import load_file

from partition.models.examples import gpt, lm_loss
from pipeline.checkpoint.save_load import export_checkpoint, save_checkpoint_async
from pipeline.checkpoint.store import MANIFEST, read_json
from pipeline.cli.command import main
from pipeline.launch.results import RunResult
from pipeline.launch.run import RunOptions, run_pipeline
from pipeline.parallel.data import global_loss, shard
from pipeline.parallel.fsdp import full
from pipeline.runtime.optim import OptimizerFactory
from pipeline.runtime.pipeline import Pipeline, PipelineOptions

M = 2  # micro-batches per replica
ADAM = OptimizerFactory("adam", 1e-2)
PATHS = ("sync", "async")  # where a loaded pipeline saves again: ROOT-sync, ROOT-async


def toy_gpt(batch: int = 4) -> Any:
    """The toy GPT (dropout off) predicting its own input tokens (the run's batch: 4 rows)."""
    model, inputs, _ = gpt("toy", batch=batch)
    return model, inputs, lm_loss, inputs[0]


def _options(dp_reduce: str, **kw: Any) -> RunOptions:
    return RunOptions(
        ranks=4,
        pp=2,
        optimizer="adam",
        lr=ADAM.lr,
        timeout=60,
        pipeline=PipelineOptions(microbatches=M, dp=2, dp_reduce=dp_reduce),
        **kw,
    )


def _losses(result: RunResult | None) -> list[float | None]:
    assert result is not None
    return [row.loss for row in result.steps]


def _export(path: Path, out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(export_checkpoint(path, out)))


def _differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert sorted(a) == sorted(b)
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fsdp_checkpoints_resume_bit_identical_and_load_under_any_mesh(tmp_path: Path) -> None:
    fsdp = functools.partial(_options, "fsdp", checkpoint_every=2)
    straight = run_pipeline(toy_gpt, fsdp(steps=4, checkpoint_dir=tmp_path / "a"))
    first = run_pipeline(toy_gpt, fsdp(steps=2, checkpoint_dir=tmp_path / "b"))
    resumed = run_pipeline(toy_gpt, fsdp(steps=4, checkpoint_dir=tmp_path / "b", resume=True))
    assert resumed is not None and resumed.resumed_from == 2
    assert all(loss is not None for loss in _losses(straight))
    assert _losses(first) == _losses(straight)[:2]
    assert _losses(resumed) == _losses(straight)  # bit for bit
    a = _export(tmp_path / "a" / "step-00000004", tmp_path / "a.safetensors")
    b = _export(tmp_path / "b" / "step-00000004", tmp_path / "b.safetensors")
    assert _differ(a, b) == []

    # the replicated format: replica 0's two pipeline ranks wrote whole tensors
    saved = tmp_path / "a" / "step-00000002"
    manifest = read_json(saved / MANIFEST)
    assert (manifest["world_size"], manifest["dp"]) == (2, 2)
    assert sorted(p.name for p in saved.glob("rank-*.json")) == [
        "rank-00000.json",
        "rank-00001.json",
    ]
    want = _export(saved, tmp_path / "two.safetensors")
    model, _, _, _ = toy_gpt()
    assert {n: tuple(t.shape) for n, t in want.items()} == {
        n: tuple(t.shape) for n, t in model.state_dict().items()
    }

    # the fsdp checkpoint under ddp and fsdp meshes: the same weights and Adam state, bit for bit
    cases = {
        ("fsdp", 2, 2): run_ranks(4, _continue_from, str(saved), 2, "fsdp", timeout=150),
        ("ddp", 2, 2): run_ranks(4, _continue_from, str(saved), 2, "ddp", timeout=150),
        ("ddp", 1, 2): run_ranks(2, _continue_from, str(saved), 2, "ddp", timeout=150),
    }
    _same_everywhere(cases, want)

    # a ddp checkpoint loads sharded
    ddp = run_pipeline(
        toy_gpt, _options("ddp", steps=2, checkpoint_dir=tmp_path / "d", checkpoint_every=2)
    )
    assert ddp is not None
    from_ddp = tmp_path / "d" / "step-00000002"
    want = _export(from_ddp, tmp_path / "d.safetensors")
    cases = {
        ("ddp", 2, 2): run_ranks(4, _continue_from, str(from_ddp), 2, "ddp", timeout=150),
        ("fsdp", 2, 2): run_ranks(4, _continue_from, str(from_ddp), 2, "fsdp", timeout=150),
    }
    _same_everywhere(cases, want)

    # saved again under fsdp, in the caller's thread and in the background: what was loaded
    for r in cases[("fsdp", 2, 2)]:
        assert r["paths"] == [str(tmp_path / f"d-{how}" / "step-00000002") for how in PATHS]
    for how in PATHS:
        out = tmp_path / f"d-{how}.safetensors"
        assert _differ(_export(tmp_path / f"d-{how}", out), want) == [], how


def _same_everywhere(
    cases: dict[tuple[str, int, int], list[dict[str, Any]]], want: dict[str, torch.Tensor]
) -> None:
    """Every mesh loaded ``want`` and the same optimizer state, and one more step from them
    ends alike (fsdp's reduce-scatter sums in another order than ddp's all-reduce: close)."""
    merged: dict[tuple[str, int, int], dict[str, dict[str, Any]]] = {}
    for case, ranks in cases.items():
        held: dict[str, dict[str, Any]] = {"optim": {}, "after": {}}
        for r in ranks:
            for name, value in r["loaded"].items():
                assert torch.equal(value, want[name]), f"{case}: {name} differs"
            held["optim"].update(r["optim"])
            held["after"].update(r["after"])
        assert set(held["after"]) == _parameter_names(), case
        merged[case] = held
    first, *others = merged.values()
    assert first["optim"], "no optimizer state was loaded"
    for case, held in zip(list(merged)[1:], others, strict=True):
        assert held["optim"].keys() == first["optim"].keys(), case
        for name, states in first["optim"].items():
            for k, v in states.items():
                assert torch.equal(held["optim"][name][k], v), f"{case}: {name}.{k} differs"
        for name, value in first["after"].items():
            torch.testing.assert_close(held["after"][name], value, rtol=1e-5, atol=1e-6)


def _continue_from(path: str, dp: int, dp_reduce: str) -> dict[str, Any]:
    """Load ``path`` as ``world / dp`` pipeline ranks × ``dp`` replicas; the loaded weights and
    Adam state (gathered), then one step on the example's batch; under fsdp, save again in the
    caller's thread and in the background, next to ``path``'s root."""
    pipe = Pipeline(  # planned for a replica's shard of the batch
        functools.partial(toy_gpt, 4 // dp),
        options=PipelineOptions(microbatches=M, dp=dp, dp_reduce=dp_reduce),
        optimizer_factory=ADAM,
    )
    pipe.load(path)
    loaded = {n: full(t.detach()).clone() for n, t in _state(pipe).items()}
    names = {id(p): n for n, p in pipe.named_parameters().items()}
    optim = {
        names[id(p)]: {k: full(v).clone() for k, v in s.items()}
        for p, s in pipe.optimizer.state.items()
    }
    paths: list[str] = []
    if dp_reduce == "fsdp":
        root = Path(path).parent
        paths.append(str(pipe.save(root.with_name(f"{root.name}-{PATHS[0]}"))))
        pending = save_checkpoint_async(pipe, root.with_name(f"{root.name}-{PATHS[1]}"))
        paths.append(str(pending.wait()))
    with torch.random.fork_rng():  # the example batch, the same on every rank
        torch.manual_seed(0)
        _, inputs, _, target = toy_gpt()
    x, y = shard((inputs[0], target), pipe.replica, pipe.dp)
    global_loss(pipe, [pipe.step(x, y)])
    after = {n: full(p.detach()).clone() for n, p in pipe.named_parameters().items()}
    return {"loaded": loaded, "optim": optim, "after": after, "paths": paths}


def _parameter_names() -> set[str]:
    model, _, _, _ = toy_gpt()
    return {n for n, _ in model.named_parameters(remove_duplicate=False)}


def _state(pipe: Pipeline) -> dict[str, torch.Tensor]:
    """This rank's parameters and persistent buffers by name."""
    out: dict[str, torch.Tensor] = {}
    for s in pipe.my_stages:
        out.update(pipe.stages[s].module.state_dict(keep_vars=True))
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_cli_saves_and_resumes_sharded_replicas(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["run", "gpt", "--ranks", "4", "--pp", "2", "--dp", "2", "--dp-reduce", "fsdp"]
    common += ["--microbatches", "2", "--optimizer", "adam", "--checkpoint-every", "2", "--json"]
    assert main([*common, "--checkpoint-dir", str(tmp_path / "a"), "--steps", "4"]) == 0
    straight = json.loads(capsys.readouterr().out)
    assert main([*common, "--checkpoint-dir", str(tmp_path / "b"), "--steps", "2"]) == 0
    capsys.readouterr()
    assert main([*common, "--checkpoint-dir", str(tmp_path / "b"), "--steps", "4", "--resume"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["resumed_from"] == 2
    assert [s["loss"] for s in resumed["steps"]] == [s["loss"] for s in straight["steps"]]
    a = _export(tmp_path / "a", tmp_path / "a.safetensors")
    b = _export(tmp_path / "b", tmp_path / "b.safetensors")
    assert _differ(a, b) == []
