"""Point-to-point transfer of the tensors crossing a stage boundary, over `torch.distributed`.

[Note: boundary protocol]
Every micro-batch sends the same tensors across a cut, so nothing is negotiated at run time: a
`Link` fixes, from the plan's `TensorSpec`s, which tensors go from which stage to which, in which
order, with which shape and dtype. Forward, stage ``s`` sends its outputs to ``s + 1``; backward,
stage ``s + 1`` sends the gradient of each of its *floating-point* inputs to ``s`` (a zero tensor
where autograd found none, so the count never varies). The receiver preallocates its buffers from
the specs (`BufferPool`), and the sender checks each tensor against its spec before the send: a
mismatch is a `BoundaryError` on the sender naming stage, micro-batch and tensor, instead of a
C++ abort or a silently mis-sized buffer on the receiver.

[Note: one message per cut]
Every message costs both ranks a fixed time whatever its size (posting it, the backend's
notifications, waking the waiting thread: ``message`` in a calibrated device spec), so the
tensors crossing one cut in one direction for one micro-batch travel as one message: the sender
copies them into one flat byte buffer (`pack`), laid out by `layout` (each tensor at a 16-byte
aligned offset, so that any dtype can view it), and the receiver's buffers are views into one
such buffer (`Packed`), received in one operation. A cut with one tensor sends it as it is.

[Note: same-peer exchange]
Two ranks may exchange activations and gradients of different cuts at once (interleaved
schedules, or 1F1B's steady state). Messages are matched by the order the schedule fixes on both
sides (checked statically by the runtime), and on backends with tags (gloo) each (cut, direction,
tensor) also has its own tag, so an activation can never be taken for a gradient.

Sends are asynchronous: `Transport.send` posts ``isend`` and returns; the handles are waited on
lazily in `Transport.flush` (at the end of a step), and the tensors are kept alive until then.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from partition.errors import BoundaryError, PeerError, PlanError
from partition.wires import TensorSpec
from pipeline.parallel.mesh import new_subgroup

__all__ = [
    "BoundaryError",
    "BufferPool",
    "Link",
    "Packed",
    "PeerError",
    "Transport",
    "global_rank",
    "gradient_specs",
    "layout",
    "pack",
    "subgroup",
]

log = logging.getLogger(__name__)

Direction = Literal["activation", "gradient"]
_MAX_TENSORS = 1 << 12  # tensors per cut, for distinct tags
_ALIGN = 16  # bytes: a packed tensor's offset, a multiple of every dtype's size


def layout(specs: Sequence[TensorSpec]) -> tuple[tuple[int, ...], int]:
    """The byte offset of each tensor of ``specs`` in their packed message, and its size; see
    [Note: one message per cut]."""
    offsets, size = [], 0
    for s in specs:
        size = -(-size // _ALIGN) * _ALIGN
        offsets.append(size)
        size += math.prod(s.shape) * s.torch_dtype.itemsize
    return tuple(offsets), size


def _views(
    flat: torch.Tensor, specs: Sequence[TensorSpec], offsets: Sequence[int]
) -> list[torch.Tensor]:
    return [
        flat[o : o + math.prod(s.shape) * s.torch_dtype.itemsize].view(s.torch_dtype).view(s.shape)
        for s, o in zip(specs, offsets, strict=True)
    ]


class Packed(list[torch.Tensor]):
    """Tensors that are views into one flat byte buffer, ``flat``: received as one message."""

    def __init__(self, tensors: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
        super().__init__(tensors)
        self.flat = flat


def pack(tensors: Sequence[torch.Tensor], specs: Sequence[TensorSpec]) -> torch.Tensor:
    """``tensors`` (shaped as ``specs``) copied into one flat byte buffer, laid out by `layout`."""
    offsets, size = layout(specs)
    flat = torch.empty(size, dtype=torch.uint8, device=tensors[0].device)
    for view, t in zip(_views(flat, specs, offsets), tensors, strict=True):
        view.copy_(t.detach())
    return flat


def gradient_specs(inputs: Sequence[TensorSpec]) -> tuple[TensorSpec, ...]:
    """The gradients sent back for a stage's ``inputs``: one per floating-point input."""
    return tuple(
        TensorSpec(f"grad_{s.name}", s.shape, s.dtype)
        for s in inputs
        if s.torch_dtype.is_floating_point
    )


def global_rank(group: dist.ProcessGroup | None, rank: int) -> int:
    """The global rank of ``rank``, a rank of ``group`` (None: the world), as ``isend``,
    ``broadcast`` and ``new_group`` take it."""
    return rank if group is None else dist.get_global_rank(group, rank)


def subgroup(group: dist.ProcessGroup | None, ranks: Sequence[int]) -> dist.ProcessGroup:
    """A process group over ``ranks`` of ``group`` (``group`` itself when that is all of them).

    A collective: every rank of ``group`` calls it, for the same ``ranks``, in the same order
    (and every replica's, for a replica's group: see [Note: subgroups of replicas] in
    `pipeline.parallel.mesh`).
    """
    if len(set(ranks)) == dist.get_world_size(group):
        return group or dist.group.WORLD  # type: ignore[return-value]
    return new_subgroup(group, ranks)


@dataclass(frozen=True)
class Link:
    """What ``src_stage`` sends to ``dst_stage`` for each micro-batch; see [Note: boundary protocol]."""

    direction: Direction
    src_stage: int
    dst_stage: int
    src_rank: int
    dst_rank: int
    specs: tuple[TensorSpec, ...]

    def __post_init__(self) -> None:
        if len(self.specs) >= _MAX_TENSORS:
            raise PlanError(
                f"{len(self.specs)} tensors cross one cut; at most {_MAX_TENSORS - 1} are supported"
            )
        object.__setattr__(
            self, "_expected", tuple((torch.Size(s.shape), s.torch_dtype) for s in self.specs)
        )

    @property
    def cut(self) -> int:
        """The cut the link crosses: ``c`` is the boundary between stages ``c`` and ``c + 1``."""
        return min(self.src_stage, self.dst_stage)

    def tag(self, index: int) -> int:
        """The message tag of tensor ``index``; see [Note: same-peer exchange]."""
        return (self.cut * _MAX_TENSORS + index) * 2 + (self.direction == "gradient")

    def check(self, tensors: Sequence[torch.Tensor], microbatch: int) -> None:
        """Raise `BoundaryError` unless ``tensors`` match the specs (count, shape, dtype)."""
        expected: tuple[tuple[torch.Size, torch.dtype], ...] = self._expected  # type: ignore[attr-defined]
        if len(tensors) == len(expected) and all(
            t.shape == shape and t.dtype == dtype
            for t, (shape, dtype) in zip(tensors, expected, strict=True)
        ):
            return
        what = "output" if self.direction == "activation" else "input gradient"
        where = f"stage {self.src_stage} sends a wrong {what} to stage {self.dst_stage} for micro-batch {microbatch}"
        if len(tensors) != len(expected):
            raise BoundaryError(
                f"{where}: {len(tensors)} tensors, the plan expects {len(expected)} "
                f"({', '.join(s.describe() for s in self.specs)})"
            )
        for t, spec in zip(tensors, self.specs, strict=True):
            if t.shape != torch.Size(spec.shape) or t.dtype != spec.torch_dtype:
                got = f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
                raise BoundaryError(
                    f"{where}: tensor {spec.name!r} is {got}, the plan expects "
                    f"{spec.dtype}{list(spec.shape)}; a stage must produce the shapes it was "
                    "planned with (re-plan if the model or the micro-batch size changed)"
                )


class BufferPool:
    """Receive buffers for one link, allocated from its specs and recycled per micro-batch.

    A received activation stays referenced by autograd until its micro-batch's backward, so a
    stage needs as many buffer sets as it holds micro-batches in flight; the runtime preallocates
    the schedule's peak and the pool grows (with a debug log) if asked for more.
    """

    def __init__(self, specs: Sequence[TensorSpec], device: torch.device, count: int = 1) -> None:
        self.specs = tuple(specs)
        self.device = device
        self._free: list[list[torch.Tensor]] = [self._allocate() for _ in range(count)]

    def _allocate(self) -> list[torch.Tensor]:
        if len(self.specs) > 1:  # views of one message: see [Note: one message per cut]
            offsets, size = layout(self.specs)
            flat = torch.empty(size, dtype=torch.uint8, device=self.device)
            return Packed(_views(flat, self.specs, offsets), flat)
        return [torch.empty(s.shape, dtype=s.torch_dtype, device=self.device) for s in self.specs]

    def acquire(self) -> list[torch.Tensor]:
        if not self._free:
            log.debug("buffer pool for %s grows", [s.name for s in self.specs])
            return self._allocate()
        return self._free.pop()

    def release(self, buffers: list[torch.Tensor]) -> None:
        self._free.append(buffers)


@dataclass
class _Posted:
    """A receive posted ahead of the action that needs it."""

    microbatch: int
    buffers: list[torch.Tensor]
    works: list[dist.Work]


class Transport:
    """Sends and receives `Link` payloads for one rank; see [Note: boundary protocol].

    [Note: receiving ahead]
    Given the order in which a step receives on each link (`expect`), the transport keeps one
    receive posted ahead per link: the next one is posted as soon as the previous one has been
    taken, so the data arrives while the rank computes instead of when it asks. Receives on a link
    are posted in the schedule's order, which is also the sender's order. This needs a backend
    whose point-to-point operations are independent of each other (gloo); on NCCL, where
    operations between two ranks run in issue order on one stream, it needs ``link_groups``.

    [Note: one communicator per link]
    On NCCL, a send and a receive between the same two ranks share one stream, in issue order, so
    a receive posted early (or a send the peer has not yet asked for) would hold back messages of
    the other direction: 1F1B's steady state deadlocks that way. Given ``link_groups``, a process
    group of the two ranks per link, every link is its own first-in-first-out channel, matched in
    the same order on both sides, which is all the schedule assumes. Gloo needs none: its
    operations are independent and tags keep links apart.
    """

    def __init__(
        self,
        rank: int,
        *,
        group: dist.ProcessGroup | None = None,
        validate: bool = True,
        link_groups: dict[tuple[str, int], dist.ProcessGroup] | None = None,
    ) -> None:
        """
        Args:
            rank: this rank, in ``group``.
            group: the pipeline's process group (default: the world).
            validate: check every sent tensor against its spec.
            link_groups: a two-rank group per ``(direction, cut)``; see [Note: one communicator
                per link].
        """
        self.rank = rank
        self.group = group
        self.validate = validate
        self._tags = dist.get_backend(group) == "gloo"
        self._link_groups = link_groups or {}
        self.prefetch = self._tags or bool(link_groups)
        self._pending: collections.deque[tuple[dist.Work, Link, int, list[torch.Tensor]]] = (
            collections.deque()
        )
        self._plan: dict[tuple[str, int], tuple[Link, BufferPool, collections.deque[int]]] = {}
        self._posted: dict[tuple[str, int], _Posted] = {}

    def _peer(self, rank: int) -> int:
        return global_rank(self.group, rank)

    def _group(self, link: Link) -> dist.ProcessGroup | None:
        return self._link_groups.get((link.direction, link.cut), self.group)

    def send(self, link: Link, tensors: Sequence[torch.Tensor], microbatch: int) -> None:
        """Validate ``tensors`` (if enabled) and post their sends; returns without waiting."""
        if self.validate:
            link.check(tensors, microbatch)
        if len(tensors) > 1:  # one message per cut: see [Note: one message per cut]
            payload = [pack(tensors, link.specs)]
        else:
            payload = [t.detach().contiguous() for t in tensors]
        peer, group = self._peer(link.dst_rank), self._group(link)
        try:
            for i, t in enumerate(payload):
                work = dist.isend(t, peer, group=group, tag=link.tag(i) if self._tags else 0)
                assert work is not None
                self._pending.append((work, link, microbatch, payload))
        except RuntimeError as e:
            raise self._peer_error(link, microbatch, "sending", e) from e
        while self._pending and self._pending[0][0].is_completed():  # drop what is done
            self._pending.popleft()

    def expect(self, receives: Sequence[tuple[Link, BufferPool, Sequence[int]]]) -> None:
        """Start a step: for each link, the pool to receive into and the micro-batches it will
        receive, in order; posts the first of each (see [Note: receiving ahead])."""
        self._plan = {
            (link.direction, link.cut): (link, pool, collections.deque(mbs))
            for link, pool, mbs in receives
        }
        self._posted = {}
        if self.prefetch:
            for key in self._plan:
                self._post_next(key)

    def _post_next(self, key: tuple[str, int]) -> None:
        link, pool, queue = self._plan[key]
        if not queue:
            return
        microbatch = queue.popleft()
        buffers = pool.acquire()
        peer, group = self._peer(link.src_rank), self._group(link)
        message = [buffers.flat] if isinstance(buffers, Packed) else buffers
        try:
            works = [
                dist.irecv(b, peer, group=group, tag=link.tag(i) if self._tags else 0)
                for i, b in enumerate(message)
            ]
        except RuntimeError as e:
            raise self._peer_error(link, microbatch, "receiving", e) from e
        self._posted[key] = _Posted(microbatch, buffers, works)  # type: ignore[arg-type]

    def recv(self, link: Link, microbatch: int) -> list[torch.Tensor]:
        """The tensors of ``microbatch`` on ``link``, in buffers from its pool (blocking).

        The caller gives the buffers back to the pool when it no longer needs them.
        """
        key = (link.direction, link.cut)
        if key not in self._posted:
            self._post_next(key)
        posted = self._posted.pop(key)
        if posted.microbatch != microbatch:
            raise PlanError(
                f"stage {link.dst_stage} expected micro-batch {posted.microbatch} from stage "
                f"{link.src_stage} and the schedule asks for {microbatch}"
            )
        try:
            for work in posted.works:
                work.wait()
        except RuntimeError as e:
            raise self._peer_error(link, microbatch, "receiving", e) from e
        if self.prefetch:
            self._post_next(key)
        return posted.buffers

    @property
    def idle(self) -> bool:
        """No send pending and no receive posted (true between steps)."""
        return not self._pending and not self._posted

    def flush(self) -> None:
        """Wait for every posted send to complete, then drop the tensors they kept alive."""
        pending, self._pending = self._pending, collections.deque()
        for work, link, microbatch, _ in pending:
            try:
                work.wait()
            except RuntimeError as e:
                raise self._peer_error(link, microbatch, "sending", e) from e

    def _peer_error(self, link: Link, microbatch: int, doing: str, error: Exception) -> PeerError:
        peer, peer_stage = (
            (link.dst_rank, link.dst_stage)
            if doing == "sending"
            else (link.src_rank, link.src_stage)
        )
        what = "activations" if link.direction == "activation" else "gradients"
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "timed out" in detail.lower():
            why = f"rank {peer} did not answer within the process group's timeout: stuck, too slow or dead"
        else:
            why = f"rank {peer} probably failed or was killed; see its log"
        return PeerError(
            f"lost rank {peer} (stage {peer_stage}) while {doing} {what} of micro-batch "
            f"{microbatch} ({why}): {detail}"
        )
