"""`pipeline.cli.export`: ``pipepart export`` writes one whole-model file, or a
``from_pretrained`` folder for a model that has ``save_pretrained``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import pipeline.checkpoint.save_load
from pipeline.cli.command import main

FACTORY = "tests.pipeline.cli.test_export:pretrained"


class Pretrained(nn.Module):
    """A stand-in for a transformers model: ``save_pretrained(folder)`` writes its weights."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)

    def save_pretrained(self, folder: str) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        save_file(dict(self.state_dict()), str(Path(folder) / "model.safetensors"))


def pretrained() -> Any:
    return Pretrained(), (torch.zeros(2, 3),)


def _fake_export(monkeypatch: pytest.MonkeyPatch, state: dict[str, torch.Tensor]) -> list[Any]:
    """`export_checkpoint` writing ``state``; returns the calls it got."""
    calls: list[Any] = []

    def export(path: Any, out: Any) -> Path:
        calls.append((str(path), str(out)))
        save_file(state, str(out))
        return Path(out)

    monkeypatch.setattr(pipeline.checkpoint.save_load, "export_checkpoint", export)
    return calls


def test_a_safetensors_file_is_the_checkpoint_exported(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls = _fake_export(monkeypatch, {"w": torch.ones(2)})
    out = tmp_path / "model.safetensors"
    assert main(["export", "ckpt/step-00000004", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    assert calls == [("ckpt/step-00000004", str(out))]
    assert main(["export", "ckpt", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"checkpoint": "ckpt", "out": str(out)}


def test_a_folder_needs_a_model(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls = _fake_export(monkeypatch, {})
    assert main(["export", "ckpt", str(tmp_path / "folder")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a .safetensors file" in err
    assert "--model hf:NAME" in err
    assert calls == [] and not (tmp_path / "folder").exists()  # refused before reading


def test_a_missing_checkpoint_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["export", str(tmp_path / "none"), str(tmp_path / "m.safetensors")]) == 2
    assert (
        capsys.readouterr().err == f"pipepart export: error: no checkpoint at {tmp_path / 'none'}\n"
    )
    assert not (tmp_path / "m.safetensors").exists()


def test_a_folder_for_a_model_with_save_pretrained(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    state = {"proj.weight": torch.arange(6.0).reshape(2, 3), "proj.bias": torch.tensor([7.0, 8.0])}
    calls = _fake_export(monkeypatch, state)
    folder = tmp_path / "finetuned"
    assert main(["export", "ckpt", str(folder), "--model", FACTORY, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"checkpoint": "ckpt", "out": str(folder)}
    assert calls[0][0] == "ckpt" and not Path(calls[0][1]).exists()  # a temporary file
    written = load_file(str(folder / "model.safetensors"))
    assert written.keys() == state.keys()
    assert all(torch.equal(written[k], state[k]) for k in state)


def test_a_checkpoint_of_another_model_is_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _fake_export(monkeypatch, {"encoder.weight": torch.zeros(2, 3)})
    folder = tmp_path / "finetuned"
    assert main(["export", "ckpt", str(folder), "--model", FACTORY]) == 2
    err = capsys.readouterr().err
    assert f"the checkpoint is not a {FACTORY} (size default)" in err, err
    assert "unexpected ['encoder.weight']" in err and not folder.exists()


def test_a_model_without_save_pretrained_is_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls = _fake_export(monkeypatch, {})
    assert main(["export", "ckpt", str(tmp_path / "folder"), "--model", "gpt"]) == 2
    err = capsys.readouterr().err
    assert "gpt is not a transformers model (no save_pretrained)" in err and calls == []


@pytest.mark.timeout(240)
def test_a_run_checkpoint_exports_into_the_model(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """End to end: two ranks save, ``pipepart export`` assembles, the plain model loads it."""
    from partition.models.registry import resolve
    from pipeline.cli.command import _parser
    from pipeline.cli.run import run_options
    from pipeline.launch.run import run_pipeline

    ckpt = str(tmp_path / "ckpt")
    argv = ["run", "gpt", "--steps", "1", "--checkpoint-dir", ckpt, "--checkpoint-every", "1"]
    options, plan = run_options(_parser().parse_args(argv))  # the run's result is not read here
    run_pipeline("gpt", options, plan=plan)
    out = tmp_path / "model.safetensors"
    assert main(["export", str(tmp_path / "ckpt"), str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    model = resolve("gpt").build().model
    state = load_file(str(out))
    model.load_state_dict(state)  # strict: every tensor, no other
    assert state.keys() >= dict(model.named_parameters()).keys()
