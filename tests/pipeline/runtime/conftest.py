"""Fixtures for the runtime's unit tests: a one-rank process group in this process."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch.distributed as dist


@pytest.fixture(scope="module")
def one_rank() -> Iterator[None]:
    """A gloo process group of one rank (this process) for the module's tests; destroyed after.

    Enough for what needs a group without a peer: a transport, a subgroup, an all-reduce.
    """
    assert not dist.is_initialized(), "another test left a process group behind"
    with tempfile.TemporaryDirectory(prefix="pipepart-") as tmp:
        dist.init_process_group(
            "gloo", init_method=f"file://{Path(tmp) / 'rendezvous'}", rank=0, world_size=1
        )
        try:
            yield
        finally:
            dist.destroy_process_group()
