"""The gradient reduction over replicas: each gradient summed with the same stage's in every
other replica, in buckets, each bucket started as soon as the last backward writing it ends.

[Note: reducing over replicas]
Replica ``r`` holds the gradient of its own shard of the batch; the optimizer must see the
gradient of the whole (global) batch, the same in every replica. A rank's parameters are split
into *ready points*: the action of its schedule after which a parameter's gradient is complete
(the last B of the stages holding it, or the last W under a split backward such as ZB-H1's).
At each ready point its parameters' gradients are copied, in buckets of up to `BUCKET_BYTES`
(DDP's default size), into one flat tensor per bucket, scaled (see [Note: one reduction per
optimizer step] in `pipeline.parallel.accumulate`) and all-reduced (a sum) over the dp group
with ``async_op=True``: the reduction of the last stage's weights runs while the earlier stages
still compute their backward. After the schedule every bucket is waited on and copied back into
``.grad``, before the tied weights' sums, the non-finite check, clipping and the optimizer.
Every rank of a dp group runs the same actions, so its buckets are started in the same order:
the collectives match. A bucket also carries one number per parameter, 1 where this replica has
a gradient: a parameter no replica's batch reached keeps no gradient (as in one process), one
that some replica's did gets the sum.

[Note: why not DDP's reducer]
``DistributedDataParallel`` reduces during autograd, from hooks on the gradient accumulators, and
assumes one forward and one backward per reduction. A pipeline stage runs ``m`` forwards before
(or interleaved with) ``m`` backwards, so DDP needs ``no_sync()`` for all but the last micro-batch
and a private call (``prepare_for_backward``) to arm the last one, which is how
``torch.distributed.pipelining`` drives it; under a split backward, W computes the weights'
gradients with ``torch.autograd.grad`` on gradient edges and adds them to ``.grad`` itself, which
DDP's hooks never see. What DDP contributes, bucketing and overlap with the backward, costs a
hundred lines when the schedule says where each backward ends; so pipepart reduces with plain
``all_reduce`` on buckets it starts at those points (``--dp-reduce ddp`` names the semantics:
replicated weights, all-reduced gradients).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from partition.errors import PeerError
from partition.planning.replicas import BUCKET_BYTES  # the planner prices these buckets

__all__ = ["BUCKET_BYTES", "GradReducer", "broadcast_from_first", "lost_replica"]


@dataclass
class _Bucket:
    """Parameters of one device and dtype whose gradients travel in one all-reduce."""

    params: list[nn.Parameter]
    flat: Tensor | None = None
    works: list[dist.Work] = field(default_factory=list)

    def start(self, group: dist.ProcessGroup | None, scale: float) -> None:
        """Copy the gradients (scaled) and one presence flag per parameter into one tensor and
        post its all-reduce."""
        first = self.params[0]
        sizes = [p.numel() for p in self.params]
        total = sum(sizes)
        flat = torch.empty(total + len(sizes), dtype=first.dtype, device=first.device)
        offset = 0
        for p, n in zip(self.params, sizes, strict=True):
            part = flat[offset : offset + n]
            if p.grad is None:
                part.zero_()
            else:
                part.copy_(p.grad.detach().reshape(-1))
            offset += n
        present = [0.0 if p.grad is None else 1.0 for p in self.params]
        flat[total:].copy_(torch.tensor(present, dtype=flat.dtype))  # one copy to the device
        if scale != 1.0:
            flat[:total].mul_(scale)
        work = dist.all_reduce(flat, group=group, async_op=True)
        assert work is not None
        self.flat, self.works = flat, [work]

    def finish(self, group: dist.ProcessGroup | None) -> None:
        """Wait for the all-reduce and write the sums back into ``.grad``.

        Raises:
            PeerError: the all-reduce failed (a replica's rank died or hangs), naming the ranks.
        """
        for work in self.works:
            try:
                work.wait()
            except RuntimeError as e:
                raise lost_replica(group, e, "all-reducing gradients") from e
        flat = self.flat
        assert flat is not None
        total = flat.numel() - len(self.params)
        present = flat[total:].tolist()  # one transfer from the device
        offset = 0
        with torch.no_grad():
            for k, p in enumerate(self.params):
                n = p.numel()
                if present[k] > 0:  # some replica has this gradient
                    summed = flat[offset : offset + n].view_as(p)
                    if p.grad is None:
                        p.grad = summed.clone()
                    else:
                        p.grad.copy_(summed)
                offset += n
        self.flat, self.works = None, []


class GradReducer:
    """This rank's gradients, all-reduced over the dp group in buckets; see [Note: reducing over
    replicas]."""

    def __init__(
        self,
        ready: Sequence[Sequence[nn.Parameter]],
        *,
        group: dist.ProcessGroup | None,
        bucket_bytes: int = BUCKET_BYTES,
    ) -> None:
        """
        Args:
            ready: for each ready point, in the order the schedule reaches them, the parameters
                whose gradients are complete there (each parameter at one point).
            group: the ranks holding the same stages in every replica.
            bucket_bytes: the most gradient bytes per bucket (a larger parameter has its own).
        """
        self.group = group
        self._points = [_buckets(params, bucket_bytes) for params in ready]
        self._started = [False] * len(self._points)

    def start(self, point: int, scale: float) -> None:
        """Post the all-reduces of ready point ``point``'s buckets (gradients times ``scale``)."""
        for bucket in self._points[point]:
            bucket.start(self.group, scale)
        self._started[point] = True

    def finish(self, scale: float) -> None:
        """Start what the schedule did not (in point order), then wait for every bucket and
        write the reduced gradients back."""
        for point, started in enumerate(self._started):
            if not started:
                self.start(point, scale)
        for buckets in self._points:
            for bucket in buckets:
                bucket.finish(self.group)
        self._started = [False] * len(self._points)


def _buckets(params: Sequence[nn.Parameter], limit: int) -> list[_Bucket]:
    """``params`` in buckets of one device and dtype, up to ``limit`` bytes each, in order
    (the order of the stage's parameters, the same on every replica)."""
    out: list[_Bucket] = []
    open_: dict[tuple[torch.device, torch.dtype], tuple[_Bucket, int]] = {}
    for p in params:
        key = (p.device, p.dtype)
        size = p.numel() * p.element_size()
        bucket, used = open_.get(key, (None, 0))
        if bucket is None or used + size > limit:
            bucket, used = _Bucket([]), 0
            out.append(bucket)
        bucket.params.append(p)
        open_[key] = (bucket, used + size)
    return out


def lost_replica(group: dist.ProcessGroup | None, error: Exception, doing: str) -> PeerError:
    """The error of a collective over the replicas (``group``) that failed while ``doing``:
    which ranks it was waiting for, and why (see [Note: a rank outlives no agent] in
    `pipeline.launch.torchrun` for a dead node)."""
    ranks = dist.get_process_group_ranks(group) if group is not None else []
    others = [r for r in ranks if r != dist.get_rank()]
    detail = str(error).splitlines()[0] if str(error) else type(error).__name__
    if "timed out" in detail.lower():
        why = "did not answer within the process group's timeout: stuck, too slow or dead"
    else:
        why = (
            "failed, was killed or lost its node (a dead torchrun agent ends its ranks); "
            "see its log"
        )
    return PeerError(
        f"lost a replica while {doing} with global rank(s) {others} (this rank's "
        f"stages in the other replicas): one of them {why}: {detail}"
    )


def broadcast_from_first(tensors: Sequence[Tensor], group: dist.ProcessGroup | None) -> None:
    """Give every replica the first replica's values of ``tensors`` (parameters and buffers,
    as DDP does at construction): they are equal by construction (the same factory, seed or
    checkpoint), and this makes sure of it whatever a factory does."""
    source = dist.get_global_rank(group, 0) if group is not None else 0
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, source, group=group)
