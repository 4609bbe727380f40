"""Which backend and device a rank uses: NCCL and a GPU of its own when the machine has one per rank.

[Note: a GPU per local rank]
NCCL needs every rank of a machine on a GPU of its own: two ranks sharing a GPU fail at their
first message. So NCCL is the default only when the machine has at least as many GPUs as it
runs ranks (its *local* ranks: all of them when the launcher spawns them, torchrun's
``LOCAL_WORLD_SIZE`` under torchrun); otherwise gloo, on the CPU. The launchers choose with
`default_backend`, and a stage lives where `stage_device` says.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["default_backend", "stage_device"]


def default_backend(local_ranks: int | None = None) -> str:
    """``"nccl"`` if this machine has a GPU for each of its ranks, else ``"gloo"``; see
    [Note: a GPU per local rank].

    Args:
        local_ranks: how many ranks run on this machine (default: torchrun's
            ``LOCAL_WORLD_SIZE``, else 1).
    """
    if local_ranks is None:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_ranks:
        return "nccl"
    return "gloo"


def stage_device(name: str | None, group: dist.ProcessGroup | None = None) -> torch.device:
    """Where this rank's stages live: ``name`` if given, else under NCCL the current GPU (the
    launchers make it ``cuda:<local rank>``), else the CPU.

    Args:
        name: a device (``PipelineOptions.device``), or None for the default.
        group: the pipeline's process group (default: the world); its backend decides.
    """
    if name is not None:
        return torch.device(name)
    if dist.get_backend(group) == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
