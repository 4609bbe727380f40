"""Checkpoints of a pipeline with replicas: one copy of each stage, written by the first replica,
its outcome known to every replica.

[Note: one copy across replicas]
Replicas hold the same weights and optimizer state (their gradients are reduced before every
optimizer step, see `pipeline.parallel.reduce`), so a checkpoint of ``dp`` replicas is the
checkpoint of one: replica 0's ranks write it exactly as a single pipeline does (DCP over its
pipeline group, the folder's lock on its rank 0, the atomic publish, the refusal of non-finite
weights; see `pipeline.checkpoint.write`), and the other replicas write nothing. They still take
part, so that a save is one decision of the whole mesh:

- before anything is written (`gather_replicas`, one all-gather over each dp group): every rank
  tells its stage-rank peer of replica 0 whether its own weights are finite, and hands it its
  RNG states. Replica 0 refuses the save if any replica's weights are not finite, and writes
  every replica's RNG states (``rng/<rank>.<replica>/...``; replica 0's stay ``rng/<rank>/...``)
  so that a resume on the same mesh draws every replica's dropout masks as the run would have;
- after it (`agree`, one broadcast over the dp group): replica 0's rank ``s`` hands the outcome,
  the published directory or the error, to its peers. Every rank returns the same directory or
  raises the same `CheckpointError`, and no replica goes on while the save is being written, so
  that the checkpoint is complete or absent for the whole job, as for one pipeline.

Loading needs none of this: every replica reads the same stage tensors (by the model's names),
so a checkpoint loads under another ``dp`` as under another split or ``pp``; the RNG states are
restored only where that rank of that replica was saved (`pipeline.checkpoint.state.rng_label`).

Sharded replicas (``dp_reduce="fsdp"``) hold disjoint shards rather than copies, so the save
gathers each one whole for replica 0 first, and the load gives each rank its shard (see [Note:
checkpoints of sharded replicas] in `pipeline.checkpoint.sharded`); the files are the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import Tensor

from partition.errors import CheckpointError
from pipeline.checkpoint.state import Checkpointable, rank_tensors, rng_label, rng_state
from pipeline.parallel.fsdp import is_sharded, shard_of
from pipeline.runtime.finite import nonfinite_names

__all__ = ["FromReplicas", "Place", "agree", "gather_replicas", "place"]


@dataclass(frozen=True)
class Place:
    """Where a pipeline's rank is among the replicas."""

    dp: int
    """How many replicas (1: a single pipeline)."""
    replica: int
    """This rank's replica; replica 0 writes."""
    group: Any
    """The ranks holding this rank's stages in every replica (None when ``dp == 1``)."""
    sharded: bool = False
    """Whether the replicas hold shards of the stages (``dp_reduce="fsdp"``) rather than copies."""


@dataclass(frozen=True)
class FromReplicas:
    """What replica 0's rank learns from its peers before it writes."""

    rng: dict[str, Tensor]
    """Every other replica's RNG states, by checkpoint key."""
    nonfinite: tuple[int, int, str] | None
    """``(replica, how many, the first name)`` of the first replica whose weights are not
    finite, or None."""


def place(pipe: Checkpointable) -> Place:
    """``pipe``'s place among its replicas (a pipeline without a mesh is one replica)."""
    found = getattr(pipe, "replicas", None)
    if found is None or found.dp == 1:
        return Place(1, 0, None)
    options = getattr(pipe, "options", None)
    sharded = options is not None and is_sharded(options, found)
    return Place(found.dp, found.replica, found.dp_group, sharded)


def gather_replicas(pipe: Checkpointable) -> FromReplicas | None:
    """Before a save, on every rank of a pipeline with replicas (a collective over the dp
    group): what replica 0's rank needs of its peers, there; None on the other replicas, and
    everywhere without replicas. See [Note: one copy across replicas]."""
    where = place(pipe)
    if where.dp == 1:
        return None
    mine: tuple[int, str, dict[str, Tensor]] = (0, "", {})
    if where.replica > 0:  # replica 0 checks its own weights as it writes
        local = rank_tensors(pipe)
        bad = nonfinite_names((key, shard_of(t)) for key, (t, _) in local.items())  # fsdp: own
        states = rng_state(rng_label(pipe.rank, where.replica))
        mine = (len(bad), bad[0] if bad else "", states)
    got: list[Any] = [None] * where.dp
    dist.all_gather_object(got, mine, group=where.group)
    if where.replica > 0:
        return None
    rng: dict[str, Tensor] = {}
    nonfinite = None
    for replica, (count, first, states) in enumerate(got):
        rng.update(states)
        if count and nonfinite is None:
            nonfinite = (replica, count, first)
    return FromReplicas(rng, nonfinite)


def agree(where: Place, group: Any, write: Callable[[], Path] | None) -> Path:
    """Replica 0 runs ``write`` (None elsewhere) and hands its outcome to the other replicas (a
    broadcast over ``group``, the ranks of the dp group): every rank returns the directory, or
    raises the same `CheckpointError`. Without replicas, ``write()``.

    Raises:
        CheckpointError: the save failed on replica 0 (the error that it raised there).
    """
    if where.dp == 1:
        assert write is not None
        return write()
    failure: BaseException | None = None
    outcome: list[Any] = [None]
    if where.replica == 0:
        assert write is not None
        try:
            outcome = [("published", str(write()))]
        except BaseException as e:  # raised here after the others know
            failure = e
            outcome = [("failed", str(e) if isinstance(e, CheckpointError) else repr(e))]
    dist.broadcast_object_list(outcome, src=dist.get_global_rank(group, 0), group=group)
    if failure is not None:
        raise failure
    kind, text = outcome[0]
    if kind == "failed":
        raise CheckpointError(f"replica 0 could not save the checkpoint: {text}")
    return Path(text)
