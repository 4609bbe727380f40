"""Running under ``torchrun``: joining its process group (one store namespace per restart) and
gathering every rank's result on rank 0."""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from pipeline.launch.job import RankJob, RankResult, run_rank
from pipeline.runtime.device import default_backend

__all__ = ["init_torchrun_group", "run_under_torchrun", "under_torchrun"]


def under_torchrun() -> bool:
    """Whether this process is a rank ``torchrun`` started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_torchrun_group(backend: str, timeout: datetime.timedelta) -> None:
    """``init_process_group`` from torchrun's environment, in a store namespace of its own per
    restart.

    [Note: one store namespace per restart]
    After ``torchrun --max-restarts`` starts the ranks again, the rendezvous store can still hold
    the addresses the dead attempt's ranks published (torch assumes a fresh store per attempt,
    and the standalone agent's store outlives it), so a new rank may dial a port nobody listens
    on any more and time out. Prefixing the keys with ``TORCHELASTIC_RESTART_COUNT`` keeps each
    attempt's addresses apart.
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or "MASTER_ADDR" not in os.environ:
        dist.init_process_group(backend, timeout=timeout)
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=not agent_store and rank == 0,
        timeout=timeout,
        multi_tenant=not agent_store,
    )
    prefixed = dist.PrefixStore(f"pipepart/restart-{restart}", store)
    dist.init_process_group(backend, store=prefixed, rank=rank, world_size=world, timeout=timeout)


def run_under_torchrun(
    job: RankJob, timeout: float, backend: str | None
) -> list[RankResult] | None:
    """Join ``torchrun``'s process group, run ``job``, and gather every rank's result on rank 0
    (None elsewhere)."""
    created = not dist.is_initialized()
    if created:
        if backend is None:
            backend = default_backend()
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        init_torchrun_group(backend, datetime.timedelta(seconds=timeout))
    result = run_rank(job)  # on failure, raise: torchrun then stops the other ranks
    root = dist.get_rank() == 0
    gathered: list[Any] = [None] * dist.get_world_size() if root else []
    dist.gather_object(result, gathered if root else None, dst=0)
    if created:
        dist.destroy_process_group()
    return gathered if root else None
