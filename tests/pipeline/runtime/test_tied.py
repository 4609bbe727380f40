"""Tied weights across ranks: found from the stages, made equal, one summed gradient, counted once.

See [Note: tied weights across ranks]: in one process autograd sums the gradients of a tied
weight's two uses into its one parameter, so across ranks each copy must end with that sum.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from harness import run_ranks
from torch import Tensor, nn

from partition import analyze
from partition.schedules.actions import Schedule, build_schedule
from partition.split import Stage, split
from pipeline.runtime.tied import Shared, TiedWeights, shared_params
from pipeline.runtime.weights import init_order

V, D = 7, 4  # vocabulary, width


class _Tied(nn.Module):
    """An embedding and an LM head sharing one weight, with a block between them."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.mid = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, D), nn.Tanh())
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.mid(self.emb(ids)))


def _layout(model: nn.Module, world: int, virtual: int = 1) -> tuple[list[Stage], Schedule]:
    analysis = analyze(model, (torch.randint(0, V, (2, 3)),))
    n, k = len(analysis.graph), world * virtual
    stages = split(analysis.traced, analysis.graph, [round(i * n / k) for i in range(k + 1)])
    name = "interleaved" if virtual > 1 else "1f1b"
    return stages, build_schedule(name, world, 4, virtual)


def test_a_weight_on_two_ranks_is_shared_and_the_last_writer_wins() -> None:
    model = _Tied()
    stages, schedule = _layout(model, 2)
    (shared,) = shared_params(stages, schedule, init_order(model))
    assert shared == Shared(("emb.weight", "head.weight"), (0, 1), source_rank=1)
    assert init_order(model)[id(model.emb.weight)] == "head.weight"  # written last in one process


def test_a_weight_whose_stages_are_on_one_rank_is_not_shared() -> None:
    model = _Tied()
    stages, schedule = _layout(model, 1, virtual=2)  # both stages on rank 0
    assert len(stages) == 2
    assert shared_params(stages, schedule, init_order(model)) == []
    stages, schedule = _layout(model, 2, virtual=2)  # stage 0 and stage 3: ranks 0 and 1
    (shared,) = shared_params(stages, schedule, init_order(model))
    assert shared.ranks == (0, 1)


# --- across ranks ---------------------------------------------------------------------------


def _tied_on_rank() -> dict[str, object]:
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = _Tied()
    stages, schedule = _layout(model, 2)
    tied = TiedWeights(stages, schedule, init_order(model))
    named = {
        n: p
        for s in schedule.stages_of(rank)
        for n, p in stages[s].module.named_parameters(remove_duplicate=False)
    }
    weight = model.emb.weight
    with torch.no_grad():
        weight.fill_(rank + 1.0)  # each rank's copy starts different
    tied.bind(named)
    after_bind = weight.detach().clone()
    counted = {n for n, p in named.items() if any(p is q for q in tied.norm_params(named))}
    weight.grad = torch.full_like(weight, 10.0**rank)  # this rank's use's gradient
    tied.reduce_grads()
    return {"bind": after_bind, "grad": weight.grad.clone(), "counted": counted}


@pytest.mark.timeout(120)
def test_two_ranks_hold_one_value_and_one_gradient() -> None:
    results = run_ranks(2, _tied_on_rank, timeout=90)
    for rank, r in enumerate(results):
        assert torch.equal(r["bind"], torch.full((V, D), 2.0)), rank  # rank 1's value won
        assert torch.equal(r["grad"], torch.full((V, D), 11.0)), rank  # 1 + 10, on both
    # the tied weight counts in the norm on its lowest rank only
    assert "emb.weight" in results[0]["counted"]
    assert not {"emb.weight", "head.weight"} & results[1]["counted"]
    assert results[1]["counted"]  # rank 1's own weights still count
