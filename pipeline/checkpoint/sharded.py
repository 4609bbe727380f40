"""Checkpoints of sharded replicas (``dp_reduce="fsdp"``): each ``DTensor`` gathered whole, one at a
time, for the save; each rank's shard of the whole tensors read back on load.

[Note: checkpoints of sharded replicas]
Under FSDP (see [Note: FSDP under a pipeline] in `pipeline.parallel.fsdp`) a stage's parameters
and its optimizer's ``exp_avg``-like state are ``DTensor``\\ s sharded over the dp group, and the
replicas hold disjoint shards instead of copies. A checkpoint of them is still the replicated one,
file for file (replica 0's ranks write the whole tensors under the model's names; see [Note: one
copy across replicas] in `pipeline.checkpoint.replicas`), so that it loads under ``ddp``, another
``dp`` or another ``pp``, and a ``ddp`` checkpoint loads sharded:

- saving, every replica gathers each ``DTensor`` whole (``full_tensor``, a collective of the dp
  group) in the same order, the sorted keys, one tensor at a time: replica 0 keeps each on the
  CPU (with the live tensors in a synchronous save, or the copies of an asynchronous one, see
  [Note: asynchronous save] in `pipeline.checkpoint.write`) and the others drop it at once, so a
  device's memory grows by one tensor at most. Everything collective happens in the caller's
  thread, before a background save starts; replica 0's non-finite check then reads whole
  tensors, the other replicas' their own shards (`pipeline.checkpoint.replicas.gather_replicas`);
- loading, every rank reads only its shard: DCP reads a ``DTensor`` by the chunk its mesh and
  placements give this rank (its local tensor is the sharded parameter's storage, so the
  parameter is written in place), and each optimizer tensor shaped like its ``DTensor``
  parameter is read into a ``DTensor`` sharded alike (`read_target`), so that the optimizer's
  loaded state is sharded as the state its own step makes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

__all__ = ["gather_whole", "read_target"]


def gather_whole(tensors: dict[str, Tensor], *, keep: bool) -> tuple[dict[str, Tensor], set[str]]:
    """``tensors`` with every ``DTensor`` gathered whole, on the CPU (a collective of each one's
    mesh: every replica calls it with the same keys); see [Note: checkpoints of sharded replicas].

    Args:
        keep: keep the whole tensors (replica 0, which writes them), or drop each once gathered.

    Returns:
        The tensors in ``tensors``' order (without the gathered ones unless ``keep``), and the
        keys of the gathered ones (fresh copies: an asynchronous save need not copy them again).
    """
    gathered: dict[str, Tensor] = {}
    for key in sorted(k for k, t in tensors.items() if isinstance(t, DTensor)):
        sharded = tensors[key]
        assert isinstance(sharded, DTensor)
        whole = sharded.full_tensor().detach()
        if keep:
            gathered[key] = whole.cpu()  # off the device before the next one is gathered
        del whole
    out = {k: gathered.get(k, t) for k, t in tensors.items() if keep or not isinstance(t, DTensor)}
    return out, set(gathered)


def read_target(param: Tensor, size: Any, dtype: torch.dtype) -> Tensor:
    """Where DCP reads a saved optimizer tensor of ``size`` and ``dtype`` for ``param``: a
    ``DTensor`` sharded as ``param`` when ``param`` is one and the tensor has its shape (so that
    this rank reads its shard only), else a whole tensor on the CPU (a step count)."""
    if isinstance(param, DTensor) and tuple(size) == tuple(param.shape):
        return torch.empty_like(param, dtype=dtype)
    return torch.empty(tuple(size), dtype=dtype)
