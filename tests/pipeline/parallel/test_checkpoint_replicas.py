"""Checkpoints of replicas (issue 19): one copy of each stage, written by replica 0; a pp=2 × dp=2
run stopped, saved and resumed ends bit-identical to one that never stopped (dropout on, so
every replica's RNG stream must resume too); the checkpoint loads under pp=2 × dp=1 and
pp=1 × dp=2 with the same parameters and optimizer state; a replica whose weights are not
finite stops the save on every rank, leaving nothing published; the CLI saves and resumes."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import run_ranks
from safetensors.torch import load_file

from partition.errors import CheckpointError
from partition.models.examples import GPT_SIZES, gpt, lm_loss
from pipeline.checkpoint.save_load import export_checkpoint, save_checkpoint_async
from pipeline.checkpoint.store import MANIFEST, read_index, read_json
from pipeline.cli.command import main
from pipeline.launch.results import RunResult
from pipeline.launch.run import RunOptions, run_pipeline
from pipeline.parallel.data import global_loss, shard
from pipeline.runtime.optim import OptimizerFactory
from pipeline.runtime.pipeline import Pipeline, PipelineOptions

M = 2  # micro-batches per replica
STEPS = 4
ADAM = OptimizerFactory("adam", 1e-2)


def dropout_gpt(batch: int = 4) -> Any:
    """A toy GPT with dropout on, predicting its own input tokens (the run's batch: 4 rows)."""
    model, inputs, _ = gpt(dataclasses.replace(GPT_SIZES["toy"], dropout=0.1), batch=batch)
    return model, inputs, lm_loss, inputs[0]


def _options(dp: int = 2, **kw: Any) -> RunOptions:
    return RunOptions(
        ranks=2 * dp,
        pp=2,
        optimizer="adam",
        lr=ADAM.lr,
        timeout=60,
        pipeline=PipelineOptions(microbatches=M, dp=dp),
        **kw,
    )


def _losses(result: RunResult | None) -> list[float | None]:
    assert result is not None
    return [row.loss for row in result.steps]


def _export(path: Path, out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(export_checkpoint(path, out)))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_replicas_stop_save_and_resume_bit_identical(tmp_path: Path) -> None:
    straight = run_pipeline(
        dropout_gpt, _options(steps=STEPS, checkpoint_dir=tmp_path / "a", checkpoint_every=2)
    )
    first = run_pipeline(
        dropout_gpt, _options(steps=2, checkpoint_dir=tmp_path / "b", checkpoint_every=2)
    )
    resumed = run_pipeline(
        dropout_gpt,
        _options(steps=STEPS, checkpoint_dir=tmp_path / "b", checkpoint_every=2, resume=True),
    )
    assert resumed is not None and resumed.resumed_from == 2
    assert _losses(first) == _losses(straight)[:2]
    assert _losses(resumed) == _losses(straight)  # bit for bit
    assert all(loss is not None for loss in _losses(straight))
    a = _export(tmp_path / "a" / "step-00000004", tmp_path / "a.safetensors")
    b = _export(tmp_path / "b" / "step-00000004", tmp_path / "b.safetensors")
    assert sorted(a) == sorted(b) and [k for k in a if not torch.equal(a[k], b[k])] == []

    # one copy: replica 0's two pipeline ranks wrote it, every replica's RNG is in it
    saved = tmp_path / "a" / "step-00000002"
    manifest = read_json(saved / MANIFEST)
    assert (manifest["world_size"], manifest["dp"]) == (2, 2)
    assert sorted(p.name for p in saved.glob("rank-*.json")) == [
        "rank-00000.json",
        "rank-00001.json",
    ]
    rng = {k for k in read_index(saved, manifest).state_dict_metadata if k.startswith("rng/")}
    assert rng == {"rng/0/cpu", "rng/1/cpu", "rng/0.1/cpu", "rng/1.1/cpu"}

    # the step-2 checkpoint under other meshes: the same weights and optimizer state
    want = _export(saved, tmp_path / "two.safetensors")
    runs = {
        (2, 2): run_ranks(4, _continue_from, str(saved), 2, timeout=120),
        (2, 1): run_ranks(2, _continue_from, str(saved), 1, timeout=120),
        (1, 2): run_ranks(2, _continue_from, str(saved), 2, timeout=120),
    }
    after: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for (pp, dp), ranks in runs.items():
        assert [r["rng"] for r in ranks] == [pp == 2] * len(ranks), (pp, dp)
        held = {}
        for r in ranks:
            for name, value in r["loaded"].items():
                assert torch.equal(value, want[name]), f"pp={pp} x dp={dp}: {name} differs"
                held[name] = r["after"][name]
        assert set(held) == _parameter_names(), (pp, dp)
        after[(pp, dp)] = held
    # one more step (dropout off) from the loaded Adam state ends alike on every mesh
    for mesh in ((2, 1), (1, 2)):
        for name, value in after[(2, 2)].items():
            torch.testing.assert_close(after[mesh][name], value, rtol=1e-5, atol=1e-6)


def _continue_from(path: str, dp: int) -> dict[str, Any]:
    """Load ``path`` as ``world / dp`` pipeline ranks × ``dp`` replicas, then one step with
    dropout off on the example's batch."""
    pipe = Pipeline(  # planned for a replica's shard of the batch
        functools.partial(dropout_gpt, 4 // dp),
        options=PipelineOptions(microbatches=M, dp=dp),
        optimizer_factory=ADAM,
    )
    info = pipe.load(path)
    loaded = {n: p.detach().clone() for n, p in pipe.named_parameters().items()}
    pipe.train(False)
    with torch.random.fork_rng():  # the example batch, the same on every rank
        torch.manual_seed(0)
        _, inputs, _, target = dropout_gpt()
    x, y = shard((inputs[0], target), pipe.replica, pipe.dp)
    global_loss(pipe, [pipe.step(x, y)])
    after = {n: p.detach().clone() for n, p in pipe.named_parameters().items()}
    return {"loaded": loaded, "after": after, "rng": info.rng_restored}


def _parameter_names() -> set[str]:
    model, _, _, _ = dropout_gpt()
    return {n for n, _ in model.named_parameters(remove_duplicate=False)}


def _save_with_a_diverged_replica(root: str) -> dict[str, Any]:
    """Replica 1's first weight becomes NaN: the save fails on every rank and nothing is
    published; made finite again, the save publishes on every rank, in the caller's thread
    and in the background."""
    pipe = Pipeline(
        dropout_gpt, options=PipelineOptions(microbatches=M, dp=2), optimizer_factory=ADAM
    )
    param = next(iter(pipe.named_parameters().values()))
    kept = param.detach().clone()
    if pipe.replica == 1 and pipe.rank == 0:
        with torch.no_grad():
            param[0] = float("nan")
    try:
        pipe.save(root)
        refused = ""
    except CheckpointError as e:
        refused = str(e)
    published = sorted(p.name for p in Path(root).glob("*step-*"))
    with torch.no_grad():
        param.copy_(kept)
    path = pipe.save(root)
    background = save_checkpoint_async(pipe, root, data_position=7).wait()  # over its own groups
    return {"refused": refused, "published": published, "paths": [str(path), str(background)]}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_replica_with_weights_not_finite_stops_the_save_everywhere(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    ranks = run_ranks(4, _save_with_a_diverged_replica, str(root), timeout=150)
    for r in ranks:
        assert "1 weight tensor(s) of replica 1 are not finite" in r["refused"], r["refused"]
        assert r["published"] == []  # not even a .tmp- folder left
        assert r["paths"] == [str(root / "step-00000000")] * 2
    assert read_json(root / "step-00000000" / MANIFEST)["data_position"] == 7


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_cli_saves_and_resumes_replicas(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["run", "gpt", "--ranks", "4", "--pp", "2", "--dp", "2", "--microbatches", "2"]
    common += ["--optimizer", "adam", "--checkpoint-every", "2", "--json"]
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
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
