"""The micro-batch rule: equal chunks along dimension 0, one check, and advice that works."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from partition.errors import BatchError
from partition.microbatch import batch_size, check_divisible, first_microbatch


@given(st.integers(0, 200), st.integers(1, 40))
def test_a_batch_divides_iff_the_chunks_are_equal_and_non_empty(batch: int, m: int) -> None:
    chunks = torch.arange(batch).chunk(m) if batch else ()
    splits = batch > 0 and len(chunks) == m and len({len(c) for c in chunks}) == 1
    if splits:
        check_divisible(batch, m)
        return
    with pytest.raises(BatchError) as info:
        check_divisible(batch, m)
    message = str(info.value)
    # the advice works: each batch it suggests divides, and so does the count it suggests
    batches = [int(x) for x in message.split("use a batch of ")[1].split("…")[0].split(", ")]
    assert batches == [m, 2 * m, 3 * m]
    for b in batches:
        check_divisible(b, m)
    if batch:
        count = int(message.rsplit("--microbatches ", 1)[1])
        check_divisible(batch, count)
        # the nearest count that divides
        divisors = [d for d in range(1, batch + 1) if batch % d == 0]
        assert abs(count - m) == min(abs(d - m) for d in divisors)


def test_messages_quote_the_numbers_and_the_fix() -> None:
    with pytest.raises(BatchError, match=r"batch 7 is not divisible by 4 micro-batches; use a "
                       r"batch of 4, 8, 12… or --microbatches 7"):  # fmt: skip
        check_divisible(7, 4)
    with pytest.raises(BatchError, match="batch 2 is smaller than 4 micro-batches"):
        check_divisible(2, 4)
    with pytest.raises(BatchError, match="batch 0 is empty"):
        check_divisible(0, 4)
    with pytest.raises(BatchError, match="micro-batches must be at least 1, got 0"):
        check_divisible(8, 0)
    # 12 with 5 asked: 4 and 6 are as near; the larger keeps more pipelining
    with pytest.raises(BatchError, match=r"--microbatches 6$"):
        check_divisible(12, 5)


def test_the_batch_size_is_dimension_0_of_a_tensor() -> None:
    assert batch_size(torch.zeros(6, 2)) == 6
    with pytest.raises(BatchError, match="got list"):
        batch_size([1, 2])
    with pytest.raises(BatchError, match="got Tensor of 0 dimensions"):
        batch_size(torch.tensor(3.0))


def test_the_first_micro_batch_is_the_first_chunk_of_every_tensor() -> None:
    x, mask = torch.arange(24.0).view(8, 3), torch.arange(8)
    scale = torch.tensor(2.0)  # 0-d: no batch dimension, passed whole
    args, kwargs = first_microbatch((x, 5, (mask, [x])), {"mask": mask, "scale": scale}, 4)
    assert torch.equal(args[0], x[:2]) and args[1] == 5
    assert torch.equal(args[2][0], mask[:2]) and torch.equal(args[2][1][0], x[:2])
    assert torch.equal(kwargs["mask"], mask[:2]) and kwargs["scale"] is scale
    assert torch.equal(args[0], torch.cat(x.chunk(4)[:1]))  # what torch's chunk gives first


def test_the_first_micro_batch_checks_the_batch() -> None:
    with pytest.raises(BatchError, match=r"inputs disagree on the batch size \(dimension 0\): "
                       r"\[4, 6\]"):  # fmt: skip
        first_microbatch((torch.zeros(4), torch.zeros(6)), None, 2)
    with pytest.raises(BatchError, match="batch 6 is not divisible by 4"):
        first_microbatch((torch.zeros(6),), None, 4)
    assert first_microbatch((3, "a"), None, 4) == ((3, "a"), {})  # no tensor: nothing to split
    with pytest.raises(BatchError, match="at least 1"):
        first_microbatch((3,), None, 0)
