"""The default backend and stage device; see [Note: a GPU per local rank]."""

from __future__ import annotations

import pytest
import torch

from pipeline.runtime import device
from pipeline.runtime.device import default_backend, stage_device


def _gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize(
    ("gpus", "local_ranks", "expected"),
    [
        (0, 1, "gloo"),
        (1, 1, "nccl"),
        (1, 2, "gloo"),
        (4, 4, "nccl"),
        (8, 4, "nccl"),
        (2, 3, "gloo"),
    ],
)
def test_nccl_only_with_a_gpu_per_local_rank(
    monkeypatch: pytest.MonkeyPatch, gpus: int, local_ranks: int, expected: str
) -> None:
    _gpus(monkeypatch, gpus)
    assert default_backend(local_ranks) == expected


def test_under_torchrun_the_local_ranks_come_from_its_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _gpus(monkeypatch, 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_backend() == "gloo"  # 4 ranks on this machine, 2 GPUs
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_backend() == "nccl"
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert default_backend() == "nccl"  # one rank


def test_the_stage_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert stage_device("cpu") == torch.device("cpu")
    assert stage_device("cuda:3") == torch.device("cuda", 3)  # as given, not checked here
    monkeypatch.setattr(device.dist, "get_backend", lambda group=None: "gloo")
    assert stage_device(None) == torch.device("cpu")
    monkeypatch.setattr(device.dist, "get_backend", lambda group=None: "nccl")
    _gpus(monkeypatch, 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert stage_device(None) == torch.device("cuda", 1)
