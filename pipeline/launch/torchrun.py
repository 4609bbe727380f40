"""Running under ``torchrun``: joining its process group (one store namespace per restart),
ending a rank whose node's agent died, and gathering every rank's result on rank 0.

[Note: a rank outlives no agent]
On each node (``torchrun --nnodes N --node-rank i ...``) an agent starts that node's ranks and
watches them: when one fails, it stops the others and the job ends with an error. An agent that
dies itself (killed, out of memory, its node shutting down) leaves its ranks running, orphaned:
they train on with the other nodes, nobody reports them, and every node's job goes on without a
monitor. So each rank watches its agent (`watch_agent`): its parent process, polled every
second. When the parent changes (the orphan was re-parented), the rank says so on stderr and
exits at once. Its peers' next send, receive or collective on it then fails (gloo closes the
connection when a process exits: a `pipeline.runtime.comm.PeerError` naming that rank), their
agents see a failed rank, and the job ends with an error on every node within seconds; a peer
that hangs instead of exiting is caught by the process group's timeout (``pipepart run
--timeout``, 300 s by default). A rank whose parent is not torchrun's agent is not watched.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from pipeline.launch.job import RankJob, RankResult, run_rank
from pipeline.runtime.device import default_backend

__all__ = [
    "AGENT_DIED",
    "init_torchrun_group",
    "run_under_torchrun",
    "under_torchrun",
    "watch_agent",
]

log = logging.getLogger(__name__)

AGENT_DIED = 75
"""The exit code of a rank that ended because its node's agent died."""


def under_torchrun() -> bool:
    """Whether this process is a rank ``torchrun`` started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def watch_agent(interval: float = 1.0) -> threading.Thread | None:
    """Under torchrun, end this rank (exit code `AGENT_DIED`) when its node's agent dies; see
    [Note: a rank outlives no agent]. Returns the watching thread (a daemon), or None when this
    process is not a rank of torchrun's."""
    if not under_torchrun() or "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    agent = os.getppid()
    where = f"rank {os.environ['RANK']} (node {os.environ.get('GROUP_RANK', '?')})"

    def watch() -> None:
        while os.getppid() == agent:
            time.sleep(interval)
        message = (
            f"[{where}] torchrun's agent on this node (pid {agent}) died: ending this rank, so "
            "that the job fails on every node instead of training on without its agent"
        )
        log.error("%s", message)
        print(message, file=sys.stderr, flush=True)
        os._exit(AGENT_DIED)

    thread = threading.Thread(target=watch, name="pipepart-agent-watch", daemon=True)
    thread.start()
    return thread


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
    watch_agent()
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
