"""A step's batch: checked before any message, split into micro-batches, and put back together.

The reference for every split is plain slicing (``x[i * b:(i + 1) * b]``); for the inverse, the
batch itself.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from partition.errors import BatchError, InputError
from partition.wires import TensorSpec
from pipeline.runtime.batch import BatchSplit, gather_outputs, reduce_losses, split_batch

M = 4  # micro-batches
B = 2  # rows per micro-batch
CPU = torch.device("cpu")
SPECS = (TensorSpec("x", (B, 3), "float32"), TensorSpec("ids", (B,), "int64"))


def _split(**changes: Any) -> BatchSplit:
    fields: dict[str, Any] = dict(
        specs=SPECS, microbatches=M, rank=0, first=True, last=True, device=CPU
    )
    return BatchSplit(**(fields | changes))


def _batch(rows: int = M * B) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rows, 3), torch.arange(rows)


def _rows(t: torch.Tensor, i: int) -> torch.Tensor:
    return t[i * B : (i + 1) * B]


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_inputs_split_into_equal_micro_batches_in_order(form: str) -> None:
    x, ids = _batch()
    inputs: Any = (x, ids) if form == "tuple" else {"ids": ids, "x": x}  # any order by name
    mb_inputs, mb_targets = split_batch(inputs, None, _split(), need_target=False)
    assert mb_targets is None
    assert mb_inputs is not None and len(mb_inputs) == M
    for i, (mx, mids) in enumerate(mb_inputs):
        assert torch.equal(mx, _rows(x, i)) and torch.equal(mids, _rows(ids, i))


def test_a_nested_target_splits_leaf_by_leaf() -> None:
    x, ids = _batch()
    y = torch.randn(M * B, 5)
    target = {"y": y, "pair": (ids, [y * 2]), "scale": 0.5}
    _, mb_targets = split_batch((x, ids), target, _split(), need_target=True)
    assert mb_targets is not None and len(mb_targets) == M
    for i, t in enumerate(mb_targets):
        assert torch.equal(t["y"], _rows(y, i))
        assert isinstance(t["pair"], tuple) and isinstance(t["pair"][1], list)
        assert torch.equal(t["pair"][0], _rows(ids, i))
        assert torch.equal(t["pair"][1][0], _rows(y * 2, i))
        assert t["scale"] == 0.5  # not a tensor: every micro-batch gets it as it is


def test_each_rank_keeps_only_what_its_stages_need() -> None:
    x, ids = _batch()
    y = torch.randn(M * B)
    middle = _split(first=False, last=False)
    assert split_batch((x, ids), y, middle, need_target=True) == (None, None)
    mb_inputs, mb_targets = split_batch((x, ids), y, _split(last=False), need_target=True)
    assert mb_inputs is not None and mb_targets is None
    mb_inputs, mb_targets = split_batch(None, y, _split(first=False), need_target=True)
    assert mb_inputs is None and mb_targets is not None


def test_a_single_tensor_is_the_only_input() -> None:
    spec = (TensorSpec("x", (B, 3), "float32"),)
    x, _ = _batch()
    mb_inputs, _ = split_batch(x, None, _split(specs=spec), need_target=False)
    assert mb_inputs is not None and torch.equal(mb_inputs[3][0], _rows(x, 3))


@pytest.mark.parametrize(
    ("inputs", "target", "message"),
    [
        ((torch.randn(7, 3), torch.arange(7)), None, "batch 7 is not divisible by 4"),
        ((torch.randn(2, 3), torch.arange(2)), None, "smaller than 4 micro-batches"),
        ({"x": torch.randn(8, 3)}, None, "the inputs lack ['ids']"),
        ((torch.randn(8, 3),), None, "takes 2 input tensor(s)"),
        (None, None, "rank 0 holds stage 0 and needs the inputs"),
        ((torch.randn(8, 3), torch.arange(6)), None, "input 'x' 8, input 'ids' 6"),
        ((torch.randn(8, 3), torch.arange(8)), torch.zeros(4), "target 4"),
        ((torch.randn(8, 4), torch.arange(8)), None, "input 'x' is float32[8, 4]"),
        ((torch.randn(8, 3).double(), torch.arange(8)), None, "float64[8, 3]"),
    ],
)
def test_a_bad_batch_is_refused_with_the_numbers(inputs: Any, target: Any, message: str) -> None:
    with pytest.raises(BatchError) as err:
        split_batch(inputs, target, _split(), need_target=False)
    assert message in str(err.value)
    assert isinstance(err.value, ValueError) and isinstance(err.value, InputError)


def test_the_last_rank_needs_the_target_its_loss_reads() -> None:
    x, ids = _batch()
    with pytest.raises(BatchError, match="rank 3 holds the last stage and needs the target"):
        split_batch((x, ids), None, _split(rank=3), need_target=True)
    _, mb_targets = split_batch((x, ids), None, _split(rank=3), need_target=False)
    assert mb_targets is None  # a target-free loss


def test_the_shape_error_says_what_batch_the_plan_expects() -> None:
    with pytest.raises(BatchError) as err:
        split_batch((torch.randn(8, 4), torch.arange(8)), None, _split(), need_target=False)
    assert "the plan's micro-batch is float32[2, 3]" in str(err.value)
    assert "4 micro-batches make a batch of float32[8, 3]" in str(err.value)


def test_gathering_the_micro_batches_gives_the_batch_back() -> None:
    x, ids = _batch()
    mb_inputs, _ = split_batch((x, ids), None, _split(), need_target=False)
    assert mb_inputs is not None
    outputs = [{"h": (mx * 2, mids), "name": "out"} for mx, mids in mb_inputs]
    whole = gather_outputs(outputs)
    assert torch.equal(whole["h"][0], x * 2) and torch.equal(whole["h"][1], ids)
    assert whole["name"] == "out"
    assert torch.equal(gather_outputs([t for t, _ in mb_inputs]), x)


def test_losses_combine_as_the_mean_or_the_sum() -> None:
    losses = [torch.tensor(v, dtype=torch.float64) for v in (1.0, 2.0, 4.0, 8.0)]
    assert reduce_losses(losses, "mean").item() == 15.0 / 4
    assert reduce_losses(losses, "sum").item() == 15.0
