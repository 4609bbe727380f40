"""A replica's shard of the global batch ([Note: a replica's shard] in `pipeline.parallel.data`)
and the global batch's loss put back together."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from partition.errors import BatchError
from pipeline.parallel.data import global_loss, shard


def test_shards_are_disjoint_and_in_order_make_the_batch() -> None:
    batch = ((torch.arange(12).reshape(6, 2),), {"y": torch.arange(6), "n": 3})
    parts = [shard(batch, k, 3) for k in range(3)]
    assert torch.equal(torch.cat([p[0][0] for p in parts]), batch[0][0])
    assert torch.equal(torch.cat([p[1]["y"] for p in parts]), batch[1]["y"])
    assert parts[1][1]["y"].tolist() == [2, 3] and parts[1][1]["n"] == 3


def test_a_batch_that_does_not_split_names_its_rows_and_the_shards() -> None:
    with pytest.raises(BatchError, match="a batch of 7 rows does not split into 2 equal shards"):
        shard((torch.zeros(7, 2), torch.zeros(7)), 0, 2)


def test_the_global_loss_of_accumulated_steps_is_their_mean_or_their_sum() -> None:
    def pipe(reduction: str) -> SimpleNamespace:
        return SimpleNamespace(dp=1, options=SimpleNamespace(loss_reduction=reduction))

    losses = [torch.tensor(1.0), torch.tensor(3.0)]
    assert float(global_loss(pipe("mean"), losses)) == 2.0  # type: ignore[arg-type]
    assert float(global_loss(pipe("sum"), losses)) == 4.0  # type: ignore[arg-type]
    assert global_loss(pipe("mean"), [None, None]) is None  # type: ignore[arg-type]
