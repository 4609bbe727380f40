"""Boundary transfers: spec checks on the sender, and activations and gradients never confused (R15)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from harness import run_ranks

from partition.wires import TensorSpec
from pipeline.runtime.comm import BoundaryError, BufferPool, Link, Transport, gradient_specs

ACT = (TensorSpec("h", (2, 8), "float32"), TensorSpec("mask", (2,), "int64"))


def _link(direction: str = "activation", specs: tuple[TensorSpec, ...] = ACT) -> Link:
    return Link(direction, 0, 1, 0, 1, specs)  # type: ignore[arg-type]


def test_check_accepts_the_planned_tensors() -> None:
    _link().check([torch.zeros(2, 8), torch.zeros(2, dtype=torch.long)], microbatch=0)


@pytest.mark.parametrize(
    ("tensors", "says"),
    [
        (
            [torch.zeros(2, 4), torch.zeros(2, dtype=torch.long)],
            "tensor 'h' is float32[2, 4], the plan expects float32[2, 8]",
        ),
        (
            [torch.zeros(2, 8, dtype=torch.float64), torch.zeros(2, dtype=torch.long)],
            "'h' is float64[2, 8]",
        ),
        ([torch.zeros(2, 8)], "1 tensors, the plan expects 2 (h: float32[2, 8], mask: int64[2])"),
    ],
)
def test_check_names_stage_microbatch_and_tensor(tensors: list[torch.Tensor], says: str) -> None:
    with pytest.raises(BoundaryError) as info:
        _link().check(tensors, microbatch=5)
    message = str(info.value)
    assert "stage 0 sends a wrong output to stage 1 for micro-batch 5" in message
    assert says in message
    assert isinstance(info.value, ValueError)


def test_gradients_are_sent_for_floating_inputs_only() -> None:
    assert gradient_specs(ACT) == (TensorSpec("grad_h", (2, 8), "float32"),)


def test_tags_keep_directions_and_cuts_apart() -> None:
    links = [
        Link(d, s, s + 1 if d == "activation" else s - 1, 0, 1, ACT)  # type: ignore[arg-type]
        for d in ("activation", "gradient")
        for s in range(1, 4)
    ]
    tags = [link.tag(i) for link in links for i in range(len(ACT))]
    assert len(tags) == len(set(tags))


def test_pool_recycles_and_grows() -> None:
    pool = BufferPool(ACT, torch.device("cpu"), count=1)
    first = pool.acquire()
    second = pool.acquire()  # grows
    assert first is not second and [t.shape for t in second] == [
        torch.Size([2, 8]),
        torch.Size([2]),
    ]
    pool.release(first)
    assert pool.acquire() is first


def _exchange(rounds: int) -> list[bool]:
    """Ranks 0 and 1 send each other activations and gradients of different shapes at once, in
    the interleaved pattern: 0→1 activations of cut 0, 1→0 gradients of cut 0 and activations of
    cut 1, 0→1 gradients of cut 1; every message checked on arrival."""
    rank = dist.get_rank()
    a0 = Link("activation", 0, 1, 0, 1, (TensorSpec("a0", (3, 5), "float32"),))
    g0 = Link("gradient", 1, 0, 1, 0, (TensorSpec("g0", (3, 5), "float32"),))
    a1 = Link(
        "activation",
        1,
        2,
        1,
        0,
        (TensorSpec("a1", (7,), "float32"), TensorSpec("i", (2,), "int64")),
    )
    g1 = Link("gradient", 2, 1, 0, 1, (TensorSpec("g1", (7,), "float32"),))
    transport = Transport(rank)
    ok = []

    def payload(link: Link, mb: int) -> list[torch.Tensor]:
        base = 1000 * link.cut + 100 * (link.direction == "gradient") + mb
        return [
            torch.full(s.shape, base + i, dtype=s.torch_dtype) for i, s in enumerate(link.specs)
        ]

    outgoing, incoming = ([a0, g1], [g0, a1]) if rank == 0 else ([g0, a1], [a0, g1])
    transport.expect(
        [(link, BufferPool(link.specs, torch.device("cpu")), range(rounds)) for link in incoming]
    )
    for mb in range(rounds):
        for link in outgoing:
            transport.send(link, payload(link, mb), mb)
        for link in reversed(incoming):  # received in another order than sent: tags match them
            got = transport.recv(link, mb)
            ok.append(all(torch.equal(g, w) for g, w in zip(got, payload(link, mb), strict=True)))
    transport.flush()
    return ok


@pytest.mark.timeout(60)
def test_activations_and_gradients_between_the_same_pair_are_never_swapped() -> None:
    for ok in run_ranks(2, _exchange, 4, timeout=45):
        assert ok and all(ok)


MIXED = (
    TensorSpec("h", (3, 5), "float32"),
    TensorSpec("pos", (3,), "int64"),
    TensorSpec("mask", (3, 1), "bool"),
    TensorSpec("half", (7,), "float16"),
    TensorSpec("none", (0, 4), "float32"),
)


def test_a_packed_message_lays_every_dtype_out_aligned_and_round_trips() -> None:
    from pipeline.runtime.comm import Packed, layout, pack

    offsets, size = layout(MIXED)
    assert offsets == (0, 64, 96, 112, 128) and size == 128  # 60, 24, 3, 14, 0 bytes, 16-aligned
    tensors = [torch.randn(3, 5), torch.arange(3), torch.tensor([[True], [False], [True]])]
    tensors += [torch.randn(7).half(), torch.zeros(0, 4)]
    received = BufferPool(MIXED, torch.device("cpu")).acquire()
    assert isinstance(received, Packed) and received.flat.numel() == size
    received.flat.copy_(pack(tensors, MIXED))  # what one message carries
    for got, sent in zip(received, tensors, strict=True):
        assert got.dtype == sent.dtype and torch.equal(got, sent)


def _count_messages(rounds: int) -> tuple[int, list[bool]]:
    """Rank 0 sends a cut of five tensors to rank 1 ``rounds`` times; each rank counts the
    point-to-point operations it posts."""
    posted = 0
    isend, irecv = dist.isend, dist.irecv

    def counting(op):  # type: ignore[no-untyped-def]
        def call(*args, **kwargs):  # type: ignore[no-untyped-def]
            nonlocal posted
            posted += 1
            return op(*args, **kwargs)

        return call

    dist.isend, dist.irecv = counting(isend), counting(irecv)  # type: ignore[assignment]
    try:
        rank = dist.get_rank()
        link = Link("activation", 0, 1, 0, 1, MIXED)
        transport = Transport(rank)
        ok = []
        if rank == 1:
            transport.expect([(link, BufferPool(MIXED, torch.device("cpu")), range(rounds))])
        for mb in range(rounds):
            payload = [torch.full((3, 5), float(mb)), torch.full((3,), mb), torch.ones(3, 1) > mb]
            payload += [torch.full((7,), mb, dtype=torch.float16), torch.zeros(0, 4)]
            if rank == 0:
                transport.send(link, payload, mb)
            else:
                got = transport.recv(link, mb)
                ok.append(all(torch.equal(g, w) for g, w in zip(got, payload, strict=True)))
        transport.flush()
        return posted, ok
    finally:
        dist.isend, dist.irecv = isend, irecv  # type: ignore[assignment]


@pytest.mark.timeout(60)
def test_the_tensors_of_one_cut_travel_as_one_message_per_microbatch() -> None:
    # [Note: one message per cut]: five tensors, one message each way per micro-batch (they
    # were five, each paying a message's fixed cost on both ranks).
    (sent, _), (received, ok) = run_ranks(2, _count_messages, 3, timeout=45)
    assert sent == 3 and received == 3
    assert ok == [True, True, True]
