"""NaN does not train on (issue 22, item 2; [Note: non-finite steps] in `pipeline.runtime.finite`):
a step whose loss or gradients are not finite stops the run on every rank, naming the step, the
stage and the tensor, or is skipped or warned about on every rank alike; a checkpoint of
non-finite weights is never published, so ``--keep`` never deletes the last finite one; and a
resume from one (an older pipepart's) is refused by name.

The run that diverges is the issue's own: ``pipepart run gpt --size toy --ranks 2 --lr 1e4``,
whose losses are 4.57, 3.1e4, 9.8e10, then NaN: step 2's gradients are the first not finite.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from harness import run_ranks
from torch import nn

from partition.errors import NonFiniteError
from partition.models.registry import resolve
from pipeline.checkpoint.lock import LOCK_NAME
from pipeline.checkpoint.store import latest_complete
from pipeline.cli.command import main
from pipeline.runtime.pipeline import Pipeline, PipelineOptions

DIVERGES = ("run", "gpt", "--size", "toy", "--ranks", "2", "--lr", "1e4")


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(4, 4) for _ in range(3)], nn.Linear(4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 4) -> (B, 1)
        return self.layers(x)


def chain() -> Any:
    return Chain(), (torch.zeros(8, 4),), F.mse_loss


def _weights(pipe: Pipeline) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in pipe.named_parameters().items()}


def _policy_run(policy: str) -> dict[str, Any]:
    """Three steps on 2 ranks; step 1's target is inf (the last stage's loss, then every
    gradient, not finite)."""
    pipe = Pipeline(
        chain,
        options=PipelineOptions(microbatches=2, on_nonfinite=policy),  # type: ignore[arg-type]
        optimizer_factory=functools.partial(torch.optim.SGD, lr=0.1),
    )
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)
    after: list[dict[str, torch.Tensor]] = []
    error = ""
    for step in range(3):
        target = torch.full_like(y, math.inf) if step == 1 else y
        try:
            pipe.step(x, target)
        except NonFiniteError as e:
            error = str(e)
            break
        after.append(_weights(pipe))
    return {"rank": dist.get_rank(), "error": error, "after": after, "steps": pipe.nonfinite_steps}


def _every_policy() -> list[dict[str, Any]]:
    return [_policy_run(policy) for policy in ("stop", "skip", "warn")]


@pytest.mark.slow
def test_every_rank_reaches_the_same_verdict_under_each_policy() -> None:
    """The loss is on rank 1 only, yet both ranks stop, skip or warn at step 1."""
    for ranks in run_ranks(2, _every_policy, timeout=200):
        stop, skip, warn = ranks
        rank = stop["rank"]
        assert stop["error"].startswith(
            f"[rank {rank} · step 1] not finite: the loss is inf on stage 1 "
            "(rank 1, 2 of 2 micro-batches)"
        )
        assert "gradients not finite on stage 0 (rank 0: " in stop["error"]
        assert "the first 'layers.0.weight'" in stop["error"] and len(stop["after"]) == 1
        assert skip["steps"] == [1] and not skip["error"] and not warn["error"]
        assert warn["steps"] == [1, 2]  # trained on: NaN weights, so step 2 is not finite either
        for name, value in skip["after"][0].items():  # step 1 dropped: the weights of step 0
            assert torch.equal(skip["after"][1][name], value), name
            assert torch.isfinite(skip["after"][2][name]).all(), name  # step 2 trained
        assert any(not torch.isfinite(w).all() for w in warn["after"][1].values())


def _steps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME)


@pytest.mark.slow
def test_a_diverging_run_stops_at_the_step_and_keeps_its_finite_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "ckpt"
    save = ("--checkpoint-dir", str(ckpt), "--checkpoint-every", "1", "--keep", "2")
    assert main([*DIVERGES, "--steps", "6", *save]) == 2
    err = capsys.readouterr().err
    assert (
        "NonFiniteError" in err and " · step 2] not finite: gradients not finite on stage 0" in err
    )
    assert "the first 'wte.weight'" in err and "--on-nonfinite skip" in err
    assert _steps(ckpt) == ["step-00000001", "step-00000002"]  # both finite, both complete
    assert latest_complete(ckpt) == (ckpt / "step-00000002", [])


@pytest.mark.slow
def test_a_diverging_run_spends_no_restart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """``--restarts`` would resume from the newest checkpoint and diverge at the same step again:
    a non-finite stop ends the run at once, saying why it does not restart."""
    ckpt = tmp_path / "ckpt"
    save = ("--checkpoint-dir", str(ckpt), "--checkpoint-every", "1", "--restarts", "2")
    assert main([*DIVERGES, "--steps", "6", *save]) == 2
    assert "NonFiniteError" in capsys.readouterr().err
    warnings = [r.getMessage() for r in caplog.records]
    assert any(w.startswith("not restarting: a step was not finite") for w in warnings)
    assert not any("restarting every rank" in w for w in warnings)


@pytest.mark.slow
def test_warn_trains_on_but_never_publishes_nonfinite_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Step 2 steps with infinite gradients; the save after step 3 is refused, and ``--keep 2``
    deletes nothing: the finite step-1 and step-2 stay, no ``.tmp-`` folder is left."""
    ckpt = tmp_path / "ckpt"
    save = ("--checkpoint-dir", str(ckpt), "--checkpoint-every", "1", "--keep", "2")
    assert main([*DIVERGES, "--steps", "6", "--on-nonfinite", "warn", *save]) == 2
    err = capsys.readouterr().err
    assert "CheckpointError" in err and f"not saving {ckpt / 'step-00000003'}: " in err
    assert "are not finite, the first 'wte.weight'" in err
    assert _steps(ckpt) == ["step-00000001", "step-00000002"]


@pytest.mark.slow
def test_skip_drops_each_nonfinite_update_and_says_how_many(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "ckpt"
    save = ("--checkpoint-dir", str(ckpt), "--checkpoint-every", "1", "--keep", "2")
    assert main([*DIVERGES, "--steps", "5", "--on-nonfinite", "skip", "--json", *save]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["notes"] == [
        "modes: one graph serves train and eval mode",
        "3 step(s) had a non-finite loss or gradients (steps 2, 3, 4): their updates were "
        "dropped (--on-nonfinite skip)",
    ]
    losses = [s["loss"] for s in out["steps"]]
    assert losses[2] == losses[3] == losses[4]  # the same weights and batch: nothing stepped
    assert _steps(ckpt) == ["step-00000004", "step-00000005"]  # finite: saved as usual


def _save_nonfinite(root: str) -> None:
    """A checkpoint of NaN weights, as a pipepart that published them wrote it."""
    import pipeline.checkpoint.write as write_module

    pipe = Pipeline(resolve("gpt", size="toy").build, options=PipelineOptions(microbatches=2))
    with torch.no_grad():
        for p in pipe.named_parameters().values():
            p.fill_(math.nan)
    write_module.nonfinite_names = lambda named: []  # type: ignore[assignment]  # the old save
    pipe.steps_done = 4
    pipe.save(root)


@pytest.mark.slow
def test_a_resume_from_nonfinite_weights_is_refused_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "ckpt"
    run_ranks(1, _save_nonfinite, str(ckpt), timeout=200)
    assert main([*DIVERGES, "--steps", "6", "--checkpoint-dir", str(ckpt), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "CheckpointError" in err
    assert f"{ckpt / 'step-00000004'} (step 4) holds weights that are not finite (rank 0: " in err
    assert "resume from an older checkpoint (move step-00000004 out of the folder)" in err
