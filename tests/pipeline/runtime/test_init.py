"""Split-independent initialisation and per-stage checkpoint loading, against one process.

The references: a whole model initialised in one process (a stage must get exactly its values,
whatever the split), and a module built fresh after ``torch.manual_seed(module_seed(...))``
(what [Note: split-independent initialisation] promises for a module without an init hook).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from partition import analyze
from partition.errors import CheckpointError
from partition.split import split
from pipeline.runtime.init import initialize, load_checkpoint, materialize, module_seed

D = 6


class _Net(nn.Module):
    """Modules that own tensors directly, at several depths, and one with an init hook."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.block = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, D), nn.Tanh())
        self.out = nn.Linear(D, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.block(self.inp(x)))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.uniform_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.normal_(module.weight)
            nn.init.zeros_(module.bias)


def test_module_seeds_depend_on_the_seed_and_the_name_only() -> None:
    assert module_seed(0, "block.1") == module_seed(0, "block.1")
    seeds = {module_seed(s, n) for s in (0, 1) for n in ("", "inp", "block.1", "block.10")}
    assert len(seeds) == 8
    assert all(0 <= s < 2**63 for s in seeds)


def test_a_module_without_a_hook_gets_its_own_reset_under_its_seed() -> None:
    model = _Net()
    initialize(model, seed=5)
    torch.manual_seed(module_seed(5, "block.1"))
    fresh = nn.Linear(D, D)  # the constructor runs reset_parameters on fresh tensors
    assert torch.equal(model.block[1].weight, fresh.weight)
    assert torch.equal(model.block[1].bias, fresh.bias)
    torch.manual_seed(module_seed(5, "out"))
    assert torch.equal(model.out.weight, nn.Linear(D, 2).weight)


def test_the_callers_random_state_is_left_alone() -> None:
    model = _Net()
    before = torch.random.get_rng_state()
    initialize(model, seed=1, init_hook=model._init_weights)
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize("hook", [False, True])
def test_every_split_gets_the_whole_models_values(hook: bool) -> None:
    reference = _Net()
    initialize(reference, seed=3, init_hook=reference._init_weights if hook else None)
    with torch.device("meta"):
        meta = _Net()
    analysis = analyze(meta, (torch.empty(4, D, device="meta"),))
    n = len(analysis.graph)
    expected = reference.state_dict()
    for cut in range(1, n):
        stages = split(analysis.traced, analysis.graph, [0, cut, n])
        for stage in stages:
            module = stage.module
            module.to_empty(device="cpu")
            initialize(module, seed=3, init_hook=meta._init_weights if hook else None, model=meta)
            for name, t in module.state_dict().items():
                assert torch.equal(t, expected[name]), f"cut {cut}: {name}"


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_stage_reads_only_its_tensors_from_a_whole_model_checkpoint(
    tmp_path: Path, suffix: str
) -> None:
    source = _Net()
    path = tmp_path / f"model{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == ".pt":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    target = nn.Sequential()
    target.block = _Net().block  # a part of the model, under the model's names
    target.block[1].weight.data.zero_()
    keys = load_checkpoint(target, path)
    assert sorted(keys) == sorted(target.state_dict())
    for name, t in target.state_dict().items():
        assert torch.equal(t, state[name]), name


def test_a_checkpoint_lacking_a_tensor_or_with_another_shape(tmp_path: Path) -> None:
    path = tmp_path / "partial.safetensors"
    save_file({"inp.weight": torch.zeros(D, D), "inp.bias": torch.zeros(3)}, str(path))
    holder = nn.Module()
    holder.inp = nn.Linear(D, D)
    holder.out = nn.Linear(D, 2)
    with pytest.raises(
        CheckpointError,
        match=r"lacks 2 tensor\(s\) of this stage, e.g. \['out.weight', 'out.bias'\]",
    ):
        load_checkpoint(holder, path)
    del holder.out
    with pytest.raises(
        CheckpointError, match=r"'inp.bias' has shape \(3,\), the model expects \(6,\)"
    ):
        load_checkpoint(holder, path)
    with pytest.raises(CheckpointError, match="no checkpoint or weights file at"):
        load_checkpoint(holder, tmp_path / "absent.pt")


def test_materialize_from_meta_with_init_or_a_checkpoint(tmp_path: Path) -> None:
    reference = _Net()
    initialize(reference, seed=9)
    with torch.device("meta"):
        by_rules, by_file = _Net(), _Net()
    materialize(by_rules, "cpu", seed=9)
    path = tmp_path / "ref.pt"
    torch.save(reference.state_dict(), path)
    materialize(by_file, "cpu", checkpoint=path)
    for module in (by_rules, by_file):
        for name, t in module.state_dict().items():
            assert t.device.type == "cpu" and torch.equal(t, reference.state_dict()[name]), name
