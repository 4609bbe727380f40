"""Weights held by stages on several ranks (a tied embedding and LM head): one value, one gradient.

[Note: tied weights across ranks]
A parameter read by stages on different ranks (``transformer.wte.weight`` on the first stage and,
tied, as ``lm_head.weight`` on the last) lives once per rank. At build time the copies are made
equal by a broadcast from the rank holding the name a whole-model initialisation writes last;
after every backward their gradients are summed over a subgroup of exactly those ranks, so every
copy takes the same optimizer step. In the global gradient norm the parameter counts once, on the
lowest of its ranks. Creating the subgroups is a collective: every rank of the pipeline creates
every subgroup, in the same (sorted) order.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from partition.schedules.actions import Schedule
from partition.split import Stage
from pipeline.parallel.fsdp import shard_of
from pipeline.runtime.comm import global_rank, subgroup

__all__ = ["Shared", "TiedWeights", "shared_params"]


@dataclass(frozen=True)
class Shared:
    """A parameter held by stages on several ranks (a tied weight)."""

    names: tuple[str, ...]
    ranks: tuple[int, ...]
    source_rank: int
    """The rank whose value wins at initialisation; see [Note: building on meta]."""


def shared_params(
    stages: list[Stage], schedule: Schedule, init_source: dict[int, str]
) -> list[Shared]:
    """Parameters held by stages on more than one rank, with the rank whose value wins."""
    # id -> [(name, stage)]: one name may sit in several stages (an export graph reads a tied
    # weight under one name wherever it is used)
    holders: dict[int, list[tuple[str, int]]] = collections.defaultdict(list)
    for stage in stages:
        for name, p in stage.module.named_parameters(remove_duplicate=False):
            holders[id(p)].append((name, stage.index))
    shared = []
    for pid, places in holders.items():
        ranks = sorted({schedule.stage_to_rank(s) for _, s in places})
        if len(ranks) < 2:
            continue
        names = dict(places)  # name -> the last stage holding it
        source_name = init_source.get(pid, "")
        source_stage = names.get(source_name, max(s for _, s in places))
        shared.append(
            Shared(tuple(sorted(names)), tuple(ranks), schedule.stage_to_rank(source_stage))
        )
    return sorted(shared, key=lambda s: s.names)


class TiedWeights:
    """This rank's side of every tied weight; see [Note: tied weights across ranks]."""

    def __init__(
        self,
        stages: Sequence[Stage],
        schedule: Schedule,
        init_source: dict[int, str],
        *,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        """Find the tied weights from the stages (all of them, on meta is fine) and create a
        subgroup of ``group`` (default: the world) per set of ranks (a collective). Call `bind`
        once this rank's are real.

        Args:
            init_source: for each parameter (by ``id``), the name a whole-model initialisation
                writes it under last (`pipeline.runtime.weights.init_order`).
        """
        self.rank = dist.get_rank(group)
        self.group = group
        self.shared = shared_params(list(stages), schedule, init_source)
        groups: dict[tuple[int, ...], dist.ProcessGroup] = {}
        for s in self.shared:  # every rank, every subgroup, in the same order
            if s.ranks not in groups:
                groups[s.ranks] = subgroup(group, s.ranks)
        self._groups = groups
        self._local: list[tuple[Shared, dist.ProcessGroup, nn.Parameter]] = []

    def bind(self, named: dict[str, nn.Parameter]) -> None:
        """Take this rank's copies (by qualified name) and make every copy equal (a broadcast
        from the source rank, on the ranks that hold one)."""
        self._local = []
        for s in self.shared:
            local = next((named[n] for n in s.names if n in named), None)
            if local is not None:
                self._local.append((s, self._groups[s.ranks], local))
        with torch.no_grad():
            for s, sub, param in self._local:
                source = global_rank(self.group, s.source_rank)
                dist.broadcast(shard_of(param.data), source, group=sub)  # fsdp: alike shards

    def norm_params(self, named: dict[str, nn.Parameter]) -> list[nn.Parameter]:
        """This rank's trainable parameters, each counted once in the global norm."""
        elsewhere = {id(p) for s, _, p in self._local if min(s.ranks) != self.rank}
        mine = {id(p): p for p in named.values() if p.requires_grad and id(p) not in elsewhere}
        return list(mine.values())

    def reduce_grads(self) -> None:
        """Sum each tied weight's gradient over the ranks holding it."""
        for _, sub, p in self._local:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(shard_of(p.grad), group=sub)
