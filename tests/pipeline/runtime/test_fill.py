"""`pipeline.runtime.weights.fill` on one rank, in this process: each source writes what it should.

The reference is the plain model, ``torch.manual_seed(seed); factory()`` (the factory's own
weights), or `initialize` on the whole model (the init rules). Across ranks, with every kind of
tensor a factory can make: ``tests/pipeline/test_weights.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from partition import analyze
from partition.errors import CheckpointError
from partition.split import Stage, split
from pipeline.runtime.init import initialize
from pipeline.runtime.options import PipelineOptions
from pipeline.runtime.tensorfile import all_tensors, save_tensors
from pipeline.runtime.weights import Materialized, allocate, fill

D = 4

pytestmark = pytest.mark.usefixtures("one_rank")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.gain = nn.Parameter(torch.rand(D) + 1)  # no init rule knows it
        self.register_buffer("freq", torch.arange(D) / 7.0, persistent=False)
        self.out = nn.Linear(D, D)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.inp(x) * self.gain * self.freq)


def _factory() -> nn.Module:
    return _Net()


def _eager(seed: int) -> dict[str, Tensor]:
    torch.manual_seed(seed)
    return all_tensors(_factory())


def _stages() -> tuple[nn.Module, list[Stage]]:
    with torch.device("meta"):
        meta = _factory()
    analysis = analyze(meta, (torch.empty(2, D, device="meta"),))
    n = len(analysis.graph)
    return meta, split(analysis.traced, analysis.graph, [0, n // 2, n])


def _fill(options: PipelineOptions) -> Materialized:
    meta, stages = _stages()
    allocated, retie = allocate([s.module for s in stages], meta, torch.device("cpu"))
    fill(allocated, model_fn=_factory, meta_model=meta, options=options)
    retie()
    return allocated


@pytest.mark.parametrize("weights", ["factory", "auto"])
def test_the_factorys_own_values_bit_for_bit(weights: str) -> None:
    allocated = _fill(PipelineOptions(weights=weights, seed=3))  # type: ignore[arg-type]
    expected = _eager(3)
    assert set(allocated.sources.values()) == {"factory"}
    for name, t in allocated.tensors().items():
        assert torch.equal(t, expected[name]), name


def test_the_launchers_file_is_read_instead_of_building_again(tmp_path: Path) -> None:
    torch.manual_seed(4)
    path = tmp_path / "factory.safetensors"
    save_tensors(_factory(), path)
    allocated = _fill(PipelineOptions(factory_weights=path, seed=0))  # the file's seed wins
    expected = _eager(4)
    for name, t in allocated.tensors().items():
        assert torch.equal(t, expected[name]), name


def test_init_rules_write_what_they_know_and_name_what_they_do_not() -> None:
    with pytest.raises(CheckpointError) as err:
        _fill(PipelineOptions(weights="init", seed=2))
    assert "2 tensor(s) of this rank's stages were written by no source" in str(err.value)
    assert "'gain'" in str(err.value) and "'freq'" in str(err.value)


def test_a_checkpoint_first_then_the_factory_for_what_it_lacks(tmp_path: Path) -> None:
    trained = _factory()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    path = tmp_path / "trained.pt"
    torch.save(trained.state_dict(), path)  # no ``freq``: it is not persistent
    allocated = _fill(PipelineOptions(checkpoint=path, weights="factory", seed=5))
    assert allocated.sources["freq"] == "factory"
    assert {allocated.sources[n] for n in trained.state_dict()} == {"checkpoint"}
    tensors = allocated.tensors()
    for name, t in trained.state_dict().items():
        assert torch.equal(tensors[name], t), name
    assert torch.equal(tensors["freq"], _eager(5)["freq"])


def test_a_checkpoint_with_init_rules_for_the_rest(tmp_path: Path) -> None:
    whole = _factory()
    initialize(whole, seed=6)
    path = tmp_path / "ckpt.safetensors"
    save_tensors(whole, path)  # every tensor, ``freq`` included
    allocated = _fill(PipelineOptions(checkpoint=path, weights="init", seed=6))
    assert set(allocated.sources.values()) == {"checkpoint"}
    for name, t in allocated.tensors().items():
        assert torch.equal(t, all_tensors(whole)[name]), name


def test_a_checkpoint_lacking_a_persistent_tensor_is_refused(tmp_path: Path) -> None:
    state = _factory().state_dict()
    del state["out.bias"]
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor\(s\) of this rank's stages"):
        _fill(PipelineOptions(checkpoint=path))
