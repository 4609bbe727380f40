"""In-place ops through trace, cost model, profile and split: every cut, both routes, exact.

Issue 9: every model with an in-place op stopped while planning (``a leaf Variable that requires
grad is being used in an in-place operation`` from the cost model). Here one small model holds
every pattern the issue names — ``nn.ReLU(inplace=True)``, ``F.relu(..., inplace=True)``, an
``add_`` residual, ``div_`` on a computed tensor, ``bernoulli_`` (timm's drop-path), an in-place op
on a graph input, BatchNorm's running statistics in train mode, and a write through a view — and
is split at every cut: a stage may start with any of them on a received activation.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from partition import analyze
from partition.cost import cost_model
from partition.devices import PRESETS
from partition.profile import profile
from partition.split import split
from partition.trace.inplace import mutates
from pipeline.runtime.stage import StageExecutor

D = 8


class InPlaceNet(nn.Module):
    """Every in-place pattern of issue 9 in one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act = nn.Linear(D, D), nn.ReLU(inplace=True)
        self.fc2, self.bn, self.fc3 = nn.Linear(D, D), nn.BatchNorm1d(D), nn.Linear(D, D)

    def forward(self, x: Tensor) -> Tensor:
        x.mul_(0.5)  # on a graph input
        h = self.act(self.fc1(x))  # nn.ReLU(inplace=True)
        y = self.fc2(h)
        y.add_(h)  # a residual
        y = F.relu(y, inplace=True)
        y = self.bn(y)  # running statistics, train mode
        keep = y.new_empty(y.shape[0], 1).bernoulli_(0.75)  # timm's drop-path
        keep.div_(0.75)
        y = y * keep
        y[:, :2].mul_(2.0)  # through a view
        z = self.fc3(y)
        w, _ = z.softmax(-1).topk(2, dim=-1)
        w.div_(w.sum(-1, keepdim=True))  # the MoE router's normalisation
        return z * w[:, :1]


def _loss(out: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(out, target)


def _eager(x: Tensor, target: Tensor) -> tuple[nn.Module, float]:
    torch.manual_seed(0)
    model = InPlaceNet()
    torch.manual_seed(1)  # the drop-path mask
    loss = _loss(model(x.clone()), target)
    loss.backward()
    return model, loss.item()


@pytest.mark.parametrize("method", ["fx", "export"])
def test_every_cut_trains_exactly_like_the_model(method: str) -> None:
    x, target = torch.randn(6, D), torch.randn(6, D)
    reference, ref_loss = _eager(x, target)
    torch.manual_seed(0)
    model = InPlaceNet()
    analysis = analyze(model, (x.clone(),), method=method)
    traced = analysis.traced
    assert any(mutates(n) for n in traced.graph.nodes)
    n = len(analysis.graph)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    for cut in range(1, n):
        model.load_state_dict(initial)
        model.zero_grad(set_to_none=True)
        stages = split(traced, analysis.graph, [0, cut, n])
        first = StageExecutor(stages[0])
        last = StageExecutor(stages[1], loss_fn=_loss)
        torch.manual_seed(1)
        sent = first.forward(0, [x.clone()])
        last.forward(0, sent, target)
        first.backward(0, last.backward(0))
        where = f"{method}, cut {cut} before {analysis.graph.names[cut]!r}"
        assert last.losses[0].item() == ref_loss, where
        for (name, p), ref in zip(model.named_parameters(), reference.parameters(), strict=True):
            assert p.grad is not None and torch.equal(p.grad, ref.grad), f"{where}: {name}"
        for (name, b), ref in zip(model.named_buffers(), reference.buffers(), strict=True):
            assert torch.equal(b, ref), f"{where}: buffer {name}"


def test_a_stage_writing_a_received_activation_copies_it_first() -> None:
    model = InPlaceNet()
    analysis = analyze(model, (torch.randn(6, D),), method="fx")
    names = analysis.graph.names
    cut = names.index("act")  # the second stage starts with nn.ReLU(inplace=True)
    stages = split(analysis.traced, analysis.graph, [0, cut, len(names)])
    code = stages[1].module.code
    assert "fc1.clone()" in code and "self.act(clone)" in code
    untouched = split(analysis.traced, analysis.graph, [0, names.index("fc1"), len(names)])
    assert "clone" not in untouched[1].module.code  # a stage that writes nothing it receives


class _Saves(nn.Module):
    """In-place ops whose saved tensors are easy to count: no view is saved."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(D, D), nn.ReLU(inplace=True), nn.Linear(D, D)
        self.bn = nn.BatchNorm1d(D)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.fc1(x))  # saves its result: fc1's output, which fc2 saves again
        y = self.fc2(h)
        y.add_(h)  # saves nothing
        y = F.relu(y, inplace=True)  # saves fc2's output, which the batch norm saves again
        return (self.bn(y) * 3).div_(2)  # neither saves anything


def _eager_saved_bytes(model: nn.Module, x: Tensor) -> int:
    """Bytes of the distinct storages autograd keeps, parameters excluded."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values())


@pytest.mark.parametrize("method", ["fx", "export"])
def test_saved_bytes_count_each_rewritten_buffer_once(method: str) -> None:
    model, x = _Saves(), torch.randn(4, D)
    costs = cost_model(analyze(model, (x,), method=method).traced)
    eager = _eager_saved_bytes(model, x)
    # x, fc1's output, fc2's output (each once), and the batch norm's mean and inverse std
    assert eager == 3 * 4 * D * 4 + 2 * D * 4
    assert sum(c.saved_bytes for c in costs) == eager


@pytest.mark.parametrize("method", ["fx", "export"])
def test_flops_of_the_nodes_add_up_to_the_models(method: str) -> None:
    model, x = InPlaceNet(), torch.randn(6, D)
    costs = cost_model(analyze(model, (x.clone(),), method=method).traced)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x.clone())
    assert sum(c.fwd_flops for c in costs) == counter.get_total_flops() > 0
    assert costs.nodes["fc1" if method == "fx" else "linear"].bwd_flops > 0


@pytest.mark.parametrize("method", ["fx", "export"])
def test_profiling_times_every_node_of_a_model_with_in_place_ops(method: str) -> None:
    model = InPlaceNet()
    analysis = analyze(model, (torch.randn(6, D),), method=method)
    timed = profile(analysis.costs, PRESETS["cpu"], repeats=2)
    written = [n.name for n in analysis.traced.graph.nodes if mutates(n)]
    assert len(written) >= 8 and all(timed.nodes[name].fwd_time is not None for name in written)
    assert timed.nodes["fc3" if method == "fx" else "linear_2"].bwd_time > 0
    assert all(p.grad is None for p in model.parameters())  # nothing of the model was touched
