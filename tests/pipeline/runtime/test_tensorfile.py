"""The tensor file a rank reads its weights from, against the module that wrote it.

(The aliases of tied weights and a pickle that would run code: ``tests/pipeline/test_weights.py``.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from partition.errors import CheckpointError, InputError
from pipeline.runtime.tensorfile import TensorFile, all_tensors, save_tensors


class _Holder(nn.Module):
    """Tensors of every kind the files hold: dtypes, a view, a 0-d and an empty tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4))
        self.register_buffer("bf16", torch.randn(5).to(torch.bfloat16))
        self.register_buffer("ids", torch.arange(6, dtype=torch.int64))
        self.register_buffer("mask", torch.tensor([True, False, True]))
        self.register_buffer("row", self.w.detach()[1])  # a view of another tensor's storage
        self.register_buffer("scalar", torch.tensor(2.5, dtype=torch.float64))
        self.register_buffer("empty", torch.zeros(0, 3), persistent=False)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[_Holder, Path]:
    module = _Holder()
    path = tmp_path / "t.safetensors"
    save_tensors(module, path)
    return module, path


def test_every_tensor_reads_back_bit_for_bit(saved: tuple[_Holder, Path]) -> None:
    module, path = saved
    with TensorFile(path) as f:
        assert f.names == set(all_tensors(module))
        for name, t in all_tensors(module).items():
            got = f.get(name)
            assert got.dtype == t.dtype and torch.equal(got, t), name
            assert f.shape(name) == tuple(t.shape)


def test_reading_into_a_tensor_straight_or_converted(saved: tuple[_Holder, Path]) -> None:
    module, path = saved
    with TensorFile(path) as f:
        same = torch.empty(3, 4)  # contiguous, CPU, the file's dtype: read straight into
        f.load_into("w", same)
        assert torch.equal(same, module.w)
        wider = torch.empty(3, 4, dtype=torch.float64)
        f.load_into("w", wider)
        assert torch.equal(wider, module.w.double())
        strided = torch.empty(4, 3).t()  # not contiguous
        f.load_into("w", strided)
        assert torch.equal(strided, module.w)
        param = nn.Parameter(torch.empty(5, dtype=torch.bfloat16))  # a leaf requiring grad
        f.load_into("bf16", param)
        assert torch.equal(param, module.bf16)


def test_a_torch_save_state_dict_reads_the_same(tmp_path: Path) -> None:
    module = _Holder()
    path = tmp_path / "t.pt"
    torch.save({**module.state_dict(), "step": 3}, path)  # a non-tensor entry is ignored
    with TensorFile(path) as f:
        assert f.names == set(module.state_dict())
        target = torch.empty(6, dtype=torch.int32)
        f.load_into("ids", target)
        assert target.tolist() == list(range(6))
        assert torch.equal(f.get("scalar"), module.scalar)


def test_what_is_missing_or_misshapen_is_named(saved: tuple[_Holder, Path]) -> None:
    _, path = saved
    with TensorFile(path) as f:
        f.require(["w", "ids"], "this stage")
        with pytest.raises(CheckpointError) as err:
            f.require(["w", "lm_head.weight", "ln.bias"], "this rank's stages")
        assert "lacks 2 tensor(s) of this rank's stages, e.g. ['lm_head.weight', 'ln.bias']" in str(
            err.value
        )
        with pytest.raises(
            CheckpointError, match=r"tensor 'w' has shape \(3, 4\), the model expects \(4, 3\)"
        ):
            f.load_into("w", torch.empty(4, 3))


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        (None, ".safetensors", "no checkpoint or weights file at"),
        (b"\x01\x00", ".safetensors", "is not a safetensors file"),
        (b"not a pickle", ".pt", "is not a tensors-only torch.save file"),
    ],
)
def test_a_file_that_is_not_one_says_so(
    tmp_path: Path, content: bytes | None, suffix: str, message: str
) -> None:
    path = tmp_path / f"bad{suffix}"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        TensorFile(path)


def test_a_saved_object_that_is_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="holds a list, not a state_dict"):
        TensorFile(path)


def test_a_tensor_cut_short_is_an_error_not_garbage(saved: tuple[_Holder, Path]) -> None:
    _, path = saved
    with TensorFile(path) as f:
        _, _, offset, nbytes = f._entries["w"]
    data = path.read_bytes()
    path.write_bytes(data[: offset + nbytes // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        TensorFile(path)


def test_a_meta_tensor_cannot_be_written(tmp_path: Path) -> None:
    with torch.device("meta"):
        module = nn.Linear(2, 2)
    with pytest.raises(InputError, match="left 'weight' on the meta device"):
        save_tensors(module, tmp_path / "m.safetensors")
