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
