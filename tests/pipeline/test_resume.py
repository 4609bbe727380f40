"""Training that survives: ``run_pipeline`` / ``pipepart run`` save every N steps, resume, and
restart after a rank dies — ending bit-identical to a run that never stopped."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from partition.errors import InputError
from partition.models.examples import GPT_SIZES, gpt, lm_loss
from pipeline.checkpoint.save_load import export_checkpoint
from pipeline.cli.command import main
from pipeline.launch.results import RunResult
from pipeline.launch.run import RunOptions, run_pipeline
from pipeline.runtime.options import PipelineOptions

M = 2  # micro-batches
STEPS = 6
_calls = 0  # loss calls in this process (each rank is a fresh process)


def dropout_gpt(marker: str | None = None, kill_at_step: int = 3) -> Any:
    """A toy GPT with dropout on (so the RNG must resume too); with ``marker``, the last
    stage's rank dies at step ``kill_at_step`` the first time (the marker file says it did)."""
    model, inputs, _ = gpt(dataclasses.replace(GPT_SIZES["toy"], dropout=0.1), batch=4)
    loss = functools.partial(_loss, marker, kill_at_step)
    return model, inputs, loss, inputs[0]  # a toy objective: predict the input tokens


def _loss(marker: str | None, kill_at_step: int, output: Any, target: Any) -> Any:
    global _calls
    dies = marker is not None and dist.is_initialized() and _calls == kill_at_step * M
    if dies and marker is not None and not os.path.exists(marker):
        Path(marker).write_text("killed")
        os._exit(3)  # as a SIGKILL'd rank would: no cleanup, no message to the peers
    _calls += 1
    return lm_loss(output, target)


def _options(**kw: Any) -> RunOptions:
    return RunOptions(
        ranks=2,
        steps=STEPS,
        optimizer="adam",
        timeout=30,
        pipeline=PipelineOptions(microbatches=M),
        **kw,
    )


def _losses(result: RunResult | None) -> list[float | None]:
    assert result is not None
    return [row.loss for row in result.steps]


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []


@pytest.mark.slow
def test_a_killed_rank_restarts_and_ends_bit_identical(tmp_path: Path) -> None:
    plain = run_pipeline(dropout_gpt, _options())
    straight = run_pipeline(
        dropout_gpt, _options(checkpoint_dir=tmp_path / "straight", checkpoint_every=2)
    )
    marker = tmp_path / "killed"
    restarted = run_pipeline(
        functools.partial(dropout_gpt, str(marker)),
        _options(checkpoint_dir=tmp_path / "restarted", checkpoint_every=2, keep=2, restarts=1),
    )
    assert restarted is not None and straight is not None
    assert marker.exists() and restarted.restarts == 1 and restarted.resumed_from == 2
    assert straight.restarts == 0 and straight.resumed_from == 0
    # saving changes no loss bit; the restarted run's every loss equals the straight run's
    assert _losses(plain) == _losses(straight) == _losses(restarted)
    assert all(loss is not None for loss in _losses(plain))
    # every parameter and buffer at the end, bit for bit
    ends = []
    for name in ("straight", "restarted"):
        out = export_checkpoint(tmp_path / name, tmp_path / f"{name}.safetensors")
        ends.append(load_file(str(out)))
    _assert_same_tensors(*ends)
    # retention: two complete checkpoints kept (steps 4 and 6)
    kept = sorted(p.name for p in (tmp_path / "restarted").iterdir() if p.name.startswith("step-"))
    assert len(kept) == 2 and kept[-1].endswith("6"), kept


def test_the_cli_saves_resumes_and_exports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "ckpt"
    common = ["run", "gpt", "--ranks", "2", "--microbatches", "2", "--optimizer", "adam"]
    common += ["--checkpoint-dir", str(ckpt), "--checkpoint-every", "2", "--json"]
    assert main([*common, "--steps", "2"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main([*common, "--steps", "4", "--resume"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["resumed_from"] == 2
    assert [s["loss"] for s in resumed["steps"]][:2] == [s["loss"] for s in first["steps"]]
    assert main([*common, "--steps", "4"]) == 0  # a fresh run over the same folder
    straight = json.loads(capsys.readouterr().out)
    assert [s["loss"] for s in straight["steps"]] == [s["loss"] for s in resumed["steps"]]

    out = tmp_path / "model.safetensors"
    assert main(["export", str(ckpt), str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(out)
    torch.manual_seed(0)
    model, _, _ = gpt("toy", batch=8)
    model.load_state_dict(load_file(str(out)), strict=True)


def test_checkpoint_flags_without_a_folder_are_refused() -> None:
    for given in ({"resume": True}, {"restarts": 1}, {"checkpoint_every": 2}, {"keep": 1}):
        with pytest.raises(InputError, match="need checkpoint_dir"):
            RunOptions(**given)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="checkpoint_every must be at least 1"):
        RunOptions(checkpoint_dir="x", checkpoint_every=0)


@pytest.mark.slow
def test_a_transformers_checkpoint_exports_a_from_pretrained_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    transformers = pytest.importorskip("transformers")
    ckpt, folder = tmp_path / "ckpt", tmp_path / "pretrained"
    run = ["run", "hf:gpt2", "--size", "tiny", "--ranks", "2", "--steps", "1"]
    run += ["--microbatches", "2", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "1"]
    assert main([*run, "--json"]) == 0
    assert main(["export", str(ckpt), str(folder), "--model", "hf:gpt2", "--size", "tiny"]) == 0
    capsys.readouterr()
    saved = load_file(str(export_checkpoint(ckpt, tmp_path / "whole.safetensors")))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder))
    loaded = model.state_dict()
    assert saved.keys() >= {k for k, _ in model.named_parameters()}
    assert all(torch.equal(loaded[k], saved[k]) for k in saved if k in loaded)


def torchrun_gpt() -> Any:
    """`dropout_gpt`, dying once where ``PIPEPART_TEST_MARKER`` says (for torchrun's ranks)."""
    return dropout_gpt(os.environ.get("PIPEPART_TEST_MARKER") or None)


def _torchrun(tmp_path: Path, name: str, marker: Path | None) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    if marker is not None:
        env["PIPEPART_TEST_MARKER"] = str(marker)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", "--max-restarts", "1", "-m", "pipeline.cli", "run"]
    command += ["test_resume:torchrun_gpt", "--ranks", "2", "--steps", str(STEPS)]
    command += ["--microbatches", str(M), "--optimizer", "adam", "--timeout", "30"]
    command += ["--checkpoint-dir", str(tmp_path / name), "--checkpoint-every", "2", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_max_restarts_resumes_bit_identical(tmp_path: Path) -> None:
    """``torchrun --max-restarts 1``: a rank dies at step 3, torchrun starts both again, they
    resume from step 2 and end equal, bit for bit, to a run nobody killed."""
    straight = _torchrun(tmp_path, "straight", None)
    marker = tmp_path / "killed"
    restarted = _torchrun(tmp_path, "restarted", marker)
    assert marker.exists() and restarted["resumed_from"] == 2 and straight["resumed_from"] == 0
    assert [s["loss"] for s in straight["steps"]] == [s["loss"] for s in restarted["steps"]]
    assert all(s["loss"] is not None for s in straight["steps"])
    ends = [
        load_file(str(export_checkpoint(tmp_path / n, tmp_path / f"{n}.safetensors")))
        for n in ("straight", "restarted")
    ]
    _assert_same_tensors(*ends)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_new_lr_on_resume_is_the_one_that_trains(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Issue 22, item 4: the checkpoint's learning rate used to win over ``--lr`` on resume, and
    nothing said so. Resumed with ``--lr 1e-30`` (plain SGD), the third step changes the weights
    by nothing visible, where the second (at 0.1) moved them."""
    ckpt = tmp_path / "ckpt"
    common = ["run", "gpt", "--size", "toy", "--ranks", "2", "--microbatches", "2"]
    common += ["--optimizer", "sgd", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "1"]
    assert main([*common, "--steps", "2", "--lr", "0.1", "--json"]) == 0
    assert main([*common, "--steps", "3", "--lr", "1e-30", "--resume"]) == 0
    out = " ".join(capfd.readouterr().out.split())  # the table may wrap a long line
    assert "resumed from step 2" in out  # said outside --json too (issue 22)
    said = "resuming with the learning rate given now, 1e-30 (the checkpoint's optimizer had 0.1)"
    assert said in out
    one, two, three = (
        load_file(str(export_checkpoint(ckpt / f"step-{k:08d}", tmp_path / f"{k}.safetensors")))
        for k in (1, 2, 3)
    )

    def moved(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)

    assert moved(one, two) > 1e-4  # at lr 0.1
    assert moved(two, three) < 1e-20  # at the lr given on resume, not the checkpoint's 0.1
