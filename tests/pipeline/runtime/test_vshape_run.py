"""The V-shaped schedules (ZB-V, DualPipeV) run: loss and every gradient equal one process, and
the two stages of the V's middle rank hand their tensors over in memory, with no message.

See [Note: placement] in `partition.schedules.placement`. Rank r holds stages r and 2p-1-r, so
the GPT's tied embedding and LM head (stages 0 and 2p-1) both sit on rank 0: no tied-weight
exchange either. Each rank counts the messages its transport sends, by link.
"""

from __future__ import annotations

import collections
import functools
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from harness import run_ranks

from partition.models import examples
from partition.schedules.actions import Kind, build_schedule, with_communication
from pipeline.runtime.pipeline import Pipeline, PipelineOptions

V_SCHEDULES = ("zb-v", "dualpipev")
STEPS = 2


def skipnet_model(batch: int) -> Any:
    model, (x,), _ = examples.skipnet(batch=batch)
    return model.double(), (x.double(),), F.mse_loss


def gpt_model(batch: int) -> Any:
    model, inputs, loss_fn = examples.gpt("toy", batch=batch, tie_weights=True)
    return model.double(), inputs, loss_fn


NUM_NODES = {"skipnet": 29, "gpt": 117}
FACTORIES = {"skipnet": skipnet_model, "gpt": gpt_model}


def _batches(model: str, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    if model == "skipnet":
        return [
            (
                torch.randn(batch, 16, generator=g, dtype=torch.float64),
                torch.randn(batch, 16, generator=g, dtype=torch.float64),
            )
            for _ in range(STEPS)
        ]
    return [
        (
            torch.randint(0, 96, (batch, 16), generator=g),
            torch.randint(0, 96, (batch, 16), generator=g),
        )
        for _ in range(STEPS)
    ]


def _run(cases: list[tuple[str, str, int]], world: int) -> list[dict[str, Any]]:
    """On a rank: each (schedule, model, micro-batches) trained ``STEPS`` steps with SGD,
    counting the transport's sends per (from stage, to stage)."""
    out = []
    for schedule, model, m in cases:
        k = 2 * world
        bounds = tuple(round(i * NUM_NODES[model] / k) for i in range(k + 1))
        pipe = Pipeline(
            functools.partial(FACTORIES[model], 2 * m),
            options=PipelineOptions(schedule=schedule, microbatches=m, bounds=bounds),
            optimizer_factory=functools.partial(torch.optim.SGD, lr=0.1),
        )
        sent: collections.Counter[tuple[int, int]] = collections.Counter()
        transport = pipe.rank_executor.transport
        original = transport.send

        def counting(
            link: Any, tensors: Any, microbatch: int, _send: Any = original, _sent: Any = sent
        ) -> None:
            _sent[link.src_stage, link.dst_stage] += 1
            _send(link, tensors, microbatch)

        transport.send = counting  # type: ignore[method-assign]
        losses, grads = [], {}
        for step, (x, y) in enumerate(_batches(model, 2 * m)):
            loss = pipe.step(x, y)
            losses.append(None if loss is None else float(loss))
            if step == 0:
                grads = {
                    n: p.grad.clone()
                    for n, p in pipe.named_parameters().items()
                    if p.grad is not None
                }
        out.append(
            {
                "stages": list(pipe.my_stages),
                "losses": losses,
                "grads": grads,
                "sent": dict(sent),
                "timeline_sends": sum(
                    a.kind in (Kind.SEND_F, Kind.SEND_B) for _, a, _, _ in pipe.timeline
                ),
            }
        )
        dist.barrier()
    return out


def _reference(model: str, m: int) -> dict[str, Any]:
    torch.manual_seed(0)  # as the pipeline's factory runs (PipelineOptions.seed)
    net, _, loss_fn = FACTORIES[model](2 * m)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    losses, grads = [], {}
    for step, (x, y) in enumerate(_batches(model, 2 * m)):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in net.named_parameters(remove_duplicate=False)}
        opt.step()
        losses.append(loss.item())
    return {"losses": losses, "grads": grads}


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 4])
def test_v_schedules_match_one_process_and_keep_the_middle_cut_local(world: int) -> None:
    cases = [
        (name, model, m)
        for name in V_SCHEDULES
        for model, m in (("skipnet", 2 * world), ("gpt", 2 * world + 1))
    ]
    results = run_ranks(world, _run, cases, world, timeout=280)
    for i, (name, model, m) in enumerate(cases):
        ranks = [r[i] for r in results]
        where = f"{name} {model} on {world} ranks, {m} micro-batches"
        assert [r["stages"] for r in ranks] == [[r, 2 * world - 1 - r] for r in range(world)]
        ref = _reference(model, m)
        (last,) = [r for r in ranks if r["losses"][0] is not None]
        assert last is ranks[0], where  # the last stage is rank 0's
        assert last["losses"] == pytest.approx(ref["losses"], abs=1e-10, rel=1e-10), where
        seen = set()
        for r in ranks:
            for n, g in r["grads"].items():
                seen.add(n)
                assert torch.isfinite(g).all(), (where, n)
                assert (g - ref["grads"][n]).abs().max().item() <= 1e-10, (where, n)
        assert seen == set(ref["grads"]), (where, sorted(set(ref["grads"]) - seen))
        # messages: one per micro-batch each way over every cut but the middle one (p-1 | p)
        cuts = [c for c in range(2 * world - 1) if c != world - 1]
        expected = {pair: m * STEPS for c in cuts for pair in ((c, c + 1), (c + 1, c))}
        sent: collections.Counter[tuple[int, int]] = collections.Counter()
        for r in ranks:
            sent.update(r["sent"])
        assert dict(sent) == expected, where
        planned = with_communication(build_schedule(name, world, m))
        per_step = sum(a.kind in (Kind.SEND_F, Kind.SEND_B) for row in planned.actions for a in row)
        assert sum(r["timeline_sends"] for r in ranks) == per_step == 2 * m * (2 * world - 2)
