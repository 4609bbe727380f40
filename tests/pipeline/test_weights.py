"""Stage weights are the factory's own, bit for bit; a tensor no source wrote is an error.

The reference is always the plain model: ``torch.manual_seed(0); model = factory()``. The models
here hold what per-module init rules cannot reproduce: nn.MultiheadAttention's
``in_proj_weight`` (set by ``_reset_parameters``), raw ``nn.Parameter(torch.randn(...))`` made in
``__init__``, a non-persistent buffer computed in ``__init__``, values a parent module writes,
and a factory that loads trained weights with ``load_state_dict``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from harness import run_ranks
from torch import nn

from partition.errors import CheckpointError
from pipeline.runtime.pipeline import Pipeline, PipelineOptions
from pipeline.runtime.tensorfile import TensorFile, all_tensors, save_tensors


class Zoo(nn.Module):
    """A little of everything the old per-module re-initialisation got wrong."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, d))  # filled in __init__
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)  # _reset_parameters
        self.register_buffer("freq", torch.rand(d) * 3, persistent=False)  # computed, not saved
        self.head = nn.Linear(d, d)
        with torch.no_grad():
            self.head.weight.mul_(0.5)  # a parent's own touch on a child's weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.cls.expand(x.shape[0], 1, -1), x], dim=1) * self.freq
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.head(h).mean(dim=1)


def zoo_factory(batch: int = 4, state: str | None = None) -> Any:
    model = Zoo()
    if state is not None:  # the factory loads trained weights itself
        model.load_state_dict(torch.load(state, weights_only=True))
    g = torch.Generator().manual_seed(5)
    on_meta = model.head.weight.device.type == "meta"
    x = (
        torch.empty(batch, 3, 16, device="meta")
        if on_meta
        else torch.randn(batch, 3, 16, generator=g)
    )
    return model, (x,), F.mse_loss, torch.zeros(batch, 16, device=x.device)


def _values(factory: Any, weights: str, checkpoint: str | None = None) -> dict[str, Any]:
    pipe = Pipeline(
        factory,
        options=PipelineOptions(
            microbatches=2,
            bounds=None,
            weights=weights,  # type: ignore[arg-type]
            checkpoint=checkpoint,
        ),
    )
    tensors: dict[str, torch.Tensor] = {}
    for s in pipe.my_stages:
        tensors.update(all_tensors(pipe.stages[s].module))
    return {
        "tensors": {n: t.detach().clone() for n, t in tensors.items()},
        "sources": dict(pipe.weight_sources),
    }


def _eager(factory: Any) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = factory()[0]
    return {n: t.detach() for n, t in all_tensors(model).items()}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("trained", [False, True])
def test_every_tensor_is_the_factorys_own(tmp_path: Path, trained: bool) -> None:
    state = None
    if trained:  # weights unlike any initialisation, loaded by the factory itself
        torch.manual_seed(99)
        saved = {k: torch.randn_like(v) * 7 for k, v in Zoo().state_dict().items()}
        state = str(tmp_path / "trained.pt")
        torch.save(saved, state)
    factory = functools.partial(zoo_factory, 4, state)
    ranks = run_ranks(2, _values, factory, "factory", timeout=100)
    want = _eager(factory)
    seen: set[str] = set()
    for r in ranks:
        assert set(r["sources"].values()) == {"factory"}
        for name, value in r["tensors"].items():
            assert torch.equal(value, want[name]), name  # bit for bit
            seen.add(name)
    assert seen == set(want)  # every parameter and buffer, persistent or not, is on some rank
    if trained:
        assert torch.equal(want["head.weight"], saved["head.weight"])


def _init_fails() -> str:
    try:
        _values(functools.partial(zoo_factory, 4), "init")
    except CheckpointError as e:
        return str(e)
    return "no error"


@pytest.mark.timeout(120)
def test_init_rules_never_leave_uninitialised_memory() -> None:
    """``cls`` (made in ``__init__``) and ``freq`` (computed there) have no init rule."""
    messages = run_ranks(2, _init_fails, timeout=100)
    assert any("'cls'" in m for m in messages), messages
    assert any("'freq'" in m for m in messages), messages
    assert all("checkpoint" in m and "factory" in m for m in messages if m != "no error")


@pytest.mark.timeout(120)
def test_checkpoint_and_the_factory_together(tmp_path: Path) -> None:
    """A state_dict checkpoint lacks the non-persistent ``freq``: it comes from the factory."""
    torch.manual_seed(3)
    saved = {k: torch.randn_like(v) for k, v in Zoo().state_dict().items()}
    assert "freq" not in saved
    path = tmp_path / "ckpt.pt"
    torch.save(saved, path)
    factory = functools.partial(zoo_factory, 4)
    ranks = run_ranks(2, _values, factory, "auto", str(path), timeout=100)
    want = _eager(factory)
    for r in ranks:
        for name, value in r["tensors"].items():
            expected = saved.get(name, want[name])
            assert torch.equal(value, expected), name
            assert r["sources"][name] == ("checkpoint" if name in saved else "factory")


def test_tensor_file_round_trip_with_aliases(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied
    model.register_buffer("ramp", torch.arange(6, dtype=torch.bfloat16), persistent=False)
    path = tmp_path / "w.safetensors"
    save_tensors(model, path)
    with TensorFile(path) as f:
        assert f.names == set(all_tensors(model))
        for name, t in all_tensors(model).items():
            assert torch.equal(f.get(name), t), name
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="truncated"):
        TensorFile(truncated)


def test_a_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    class Boom:
        def __reduce__(self) -> Any:
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    torch.save({"w": Boom()}, path)
    with pytest.raises(CheckpointError, match="tensors-only"):
        TensorFile(path)
    assert not (tmp_path / "pwned").exists()
