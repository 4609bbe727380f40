"""The bucketed reduction over replicas ([Note: reducing over replicas] in
`pipeline.parallel.reduce`) on a group of one rank: what it writes back, what it leaves alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from partition.errors import PeerError
from pipeline.parallel.reduce import GradReducer, _buckets, broadcast_from_first, lost_replica

pytestmark = pytest.mark.usefixtures("one_rank")


def test_buckets_keep_order_split_by_size_and_by_dtype() -> None:
    a, b, c = (nn.Parameter(torch.zeros(4)) for _ in range(3))
    d = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    buckets = _buckets([a, b, d, c], limit=32)  # two float32 tensors of 16 bytes per bucket
    assert [[id(p) for p in bucket.params] for bucket in buckets] == [
        [id(a), id(b)],
        [id(d)],
        [id(c)],
    ]


def test_reduced_gradients_are_scaled_written_back_and_a_missing_one_stays_missing() -> None:
    used, unused = nn.Parameter(torch.zeros(2, 3)), nn.Parameter(torch.zeros(5))
    used.grad = torch.arange(6.0).reshape(2, 3)
    held = used.grad
    reducer = GradReducer([[used], [unused]], group=None)
    reducer.start(0, 0.5)
    reducer.finish(0.5)  # starts point 1 too
    assert used.grad is held  # written in place
    assert used.grad.tolist() == (torch.arange(6.0).reshape(2, 3) * 0.5).tolist()
    assert unused.grad is None  # no replica's batch reached it: as in one process


def test_the_first_replica_values_win() -> None:
    t = torch.ones(3)
    broadcast_from_first([t], None)
    assert t.tolist() == [1.0, 1.0, 1.0]


def test_a_lost_replica_is_named_with_why() -> None:
    reset = lost_replica(
        None, RuntimeError("Read error: Connection reset"), "all-reducing gradients"
    )
    assert isinstance(reset, PeerError) and isinstance(reset, ConnectionError)
    assert str(reset).startswith("lost a replica while all-reducing gradients with global rank(s)")
    assert "failed, was killed or lost its node" in str(reset) and "Connection reset" in str(reset)
    late = lost_replica(None, RuntimeError("Timed out waiting 30000ms"), "summing the losses")
    assert "did not answer within the process group's timeout" in str(late)
