"""Shared fixtures: every test is seeded and single-threaded; `one_rank` is a process group of
one rank in the test process, for what needs a group but no peer."""

from __future__ import annotations

import random
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist


@pytest.fixture(autouse=True)
def _seeded() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    torch.set_num_threads(1)


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
