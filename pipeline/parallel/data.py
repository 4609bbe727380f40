"""Data for replicas: each reads a disjoint shard of the global batch (`shard`), and the global
batch's loss is put back together from the replicas' (`global_loss`).

[Note: a replica's shard]
The global batch of one optimizer step is ``K * D`` equal parts, ``K`` accumulation steps times
``D`` replicas: part ``k * D + r`` (rows ``[(k*D + r) * b, (k*D + r + 1) * b)``, ``b`` the rows
per part) is what replica ``r`` trains on at accumulation step ``k``, split into the plan's
micro-batches. Concatenated in part order they are the global batch, so one process running its
``K * D * m`` micro-batches in order sees the same rows (`pipepart run --check` does). In a
script of your own, ``torch.utils.data.DistributedSampler(dataset, num_replicas=pipe.dp,
rank=pipe.replica)`` gives the same disjointness from a dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from partition.errors import BatchError
from partition.microbatch import batch_size
from pipeline.parallel.reduce import lost_replica
from pipeline.runtime.batch import tensors_in

if TYPE_CHECKING:
    from pipeline.runtime.pipeline import Pipeline

__all__ = ["global_loss", "shard"]


def shard(batch: Any, index: int, count: int) -> Any:
    """Part ``index`` of ``count`` equal parts of ``batch`` along dimension 0, in whatever
    (nested) tuple, list or dict holds its tensors (anything else is kept whole); see [Note: a
    replica's shard].

    Raises:
        BatchError: the batch's rows do not split into ``count`` equal parts.
    """
    sizes = {batch_size(t) for t in tensors_in(batch)}
    for rows in sizes:
        if rows % count:
            raise BatchError(
                f"a batch of {rows} rows does not split into {count} equal shards (accumulation "
                f"steps x replicas); use a batch that is a multiple of {count}"
            )
    return _part(batch, index, count)


def global_loss(pipe: Pipeline, losses: Sequence[Tensor | None]) -> Tensor | None:
    """The loss of the global batch on the last stage's ranks (None elsewhere): this replica's
    losses of the steps since the last optimizer step (what `Pipeline.step` returned),
    combined with every other replica's (an all-reduce over the last stage's dp group) as the
    pipeline's ``loss_reduction`` says: their mean, or their sum."""
    mine = [loss for loss in losses if loss is not None]
    if not mine:
        return None
    total = torch.stack([loss.detach().double() for loss in mine]).sum()
    if pipe.dp > 1:
        try:
            dist.all_reduce(total, group=pipe.replicas.dp_group)
        except RuntimeError as e:
            raise lost_replica(pipe.replicas.dp_group, e, "summing the replicas' losses") from e
    if pipe.options.loss_reduction == "mean":
        total = total / (len(mine) * pipe.dp)
    return total.to(mine[0].dtype)


def _part(value: Any, index: int, count: int) -> Any:
    if isinstance(value, Tensor):
        rows = value.shape[0] // count
        return value[index * rows : (index + 1) * rows]
    if isinstance(value, (tuple, list)):
        return type(value)(_part(v, index, count) for v in value)
    if isinstance(value, dict):
        return {k: _part(v, index, count) for k, v in value.items()}
    return value
