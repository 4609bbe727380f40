"""The cost model: FLOPs equal torch's counter exactly, parameter and activation bytes, networkx."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from partition.cost import cost_model
from partition.graph import linearize
from partition.models.examples import Block, GPTConfig, gpt
from partition.trace.fx import trace


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))


class _MatmulBmm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 7))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = torch.matmul(x, self.w)  # (B, 5, 7)
        return torch.bmm(a, y)  # (B, 5, 3)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.size(0), x.size(1), 3, 2, 8).unbind(2)
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.mid = nn.Linear(6, 6)
        self.out = nn.Linear(6, 11, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mid(self.embed(idx))))


def _cases() -> list[tuple[str, nn.Module, tuple[torch.Tensor, ...]]]:
    config = GPTConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=8)
    model, (idx,), _ = gpt(config, batch=2)
    return [
        (
            "linear",
            nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)),
            (torch.randn(3, 8),),
        ),
        ("conv2d", _Conv(), (torch.randn(2, 3, 6, 6),)),
        ("matmul-bmm", _MatmulBmm(), (torch.randn(2, 5, 6), torch.randn(2, 7, 3))),
        ("sdpa", _Attention(), (torch.randn(2, 4, 16),)),
        ("gpt-block", Block(config), (torch.randn(2, 8, 8),)),
        ("gpt", model, (idx,)),
    ]


@pytest.mark.parametrize(("name", "model", "inputs"), _cases(), ids=[c[0] for c in _cases()])
def test_flops_equal_the_counter_over_a_real_forward_and_backward(
    name: str, model: nn.Module, inputs: tuple[torch.Tensor, ...]
) -> None:
    costs = cost_model(trace(model, inputs))
    # torch's CPU flash-attention kernel is invisible to FlopCounterMode; the math kernel is what
    # meta tensors run, so the reference runs it too.
    forward = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), forward:
        out = model(*inputs)
    assert costs.fwd_flops == forward.get_total_flops() > 0
    backward = FlopCounterMode(display=False)
    float_inputs = [x.requires_grad_() for x in inputs if x.is_floating_point()]
    with sdpa_kernel(SDPBackend.MATH):
        out = model(*inputs)
    with backward:
        torch.autograd.grad(out.sum(), [*model.parameters(), *float_inputs], allow_unused=True)
    assert sum(c.bwd_flops for c in costs) == backward.get_total_flops()


def _unique_param_bytes(model: nn.Module) -> int:
    seen = {id(p): p for p in [*model.parameters(), *model.buffers()]}
    return sum(p.numel() * p.element_size() for p in seen.values())


@pytest.mark.parametrize(("name", "model", "inputs"), _cases(), ids=[c[0] for c in _cases()])
def test_param_bytes_count_each_parameter_once(
    name: str, model: nn.Module, inputs: tuple[torch.Tensor, ...]
) -> None:
    costs = cost_model(trace(model, inputs))
    assert costs.param_bytes + sum(c.buffer_bytes for c in costs) == _unique_param_bytes(model)
    assert costs.param_numel == sum(p.numel() for p in model.parameters())  # buffers apart
    owners = [q for c in costs for q in c.params]
    assert len(owners) == len(set(owners))


def test_tied_weight_is_counted_once() -> None:
    model = _Tied()
    costs = cost_model(trace(model, (torch.randint(0, 11, (2, 3)),)))
    assert costs.param_bytes == _unique_param_bytes(model) == (11 * 6 + 6 * 6 + 6) * 4
    assert costs.nodes["embed"].params == ("embed.weight",)
    assert costs.nodes["out"].param_bytes == 0  # the head reads the embedding's weight


def test_saved_bytes_and_output_bytes() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    costs = cost_model(trace(model, (torch.randn(5, 8),)))
    by_target = {c.module_path: c for c in costs}
    assert by_target["0"].output_bytes == 5 * 16 * 4
    assert by_target["0"].saved_bytes == 5 * 8 * 4  # its input; the weight is not an activation
    assert by_target["1"].saved_bytes == 5 * 16 * 4  # tanh keeps its output
    assert by_target["2"].saved_bytes == 0  # it saves the tanh output, already counted once
    assert sum(c.saved_bytes for c in costs) == 5 * 8 * 4 + 5 * 16 * 4


def test_networkx_view_has_costs_and_edge_bytes() -> None:
    model, (idx,), _ = gpt("toy", batch=2, seq=4)
    costs = cost_model(trace(model, (idx,)))
    graph = costs.to_networkx()
    assert nx.is_directed_acyclic_graph(graph)
    assert graph.number_of_nodes() == len(costs)
    assert graph.nodes["lm_head"]["fwd_flops"] == 2 * 2 * 4 * 16 * model.config.vocab_size
    assert graph.edges["ln_f", "lm_head"]["bytes"] == 2 * 4 * 16 * 4


def test_cut_widths_follow_live_tensors() -> None:
    model, (idx,), _ = gpt("toy", batch=2, seq=4)
    graph = linearize(cost_model(trace(model, (idx,))))
    residual = 2 * 4 * 16 * 4
    at = {name: i for i, name in enumerate(graph.names)}
    # right after a block's residual add, only the residual stream is live
    assert graph.cut_bytes[at["add_2"] + 1] == residual
    # inside the block the residual is live beside the branch
    assert graph.cut_bytes[at["h_1_ln_1"] + 1] >= 2 * residual
    assert graph.cut_bytes[0] == graph.cut_bytes[-1] == 0


class FunctionalBatchNorm(nn.Module):
    """BatchNorm written as a function, as timm's ``BatchNormAct2d`` is traced: its running
    statistics reach ``F.batch_norm`` as ``get_attr`` nodes; and a mask made from an integer
    input, which nothing differentiates."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("running_mean", torch.zeros(8))
        self.register_buffer("running_var", torch.ones(8))

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        h = F.batch_norm(self.fc(x), self.running_mean, self.running_var, training=True)
        mask = (ids > 0).float()
        return h * mask.unsqueeze(-1)


def test_buffers_and_masks_are_not_differentiated() -> None:
    """Issue 18, item 2: the cost model made every floating input require grad, so a BatchNorm
    traced as a function crashed it (``native_batch_norm`` is not differentiable with respect to
    ``running_mean``); a mask of integer inputs was charged a backward it never has."""
    model = FunctionalBatchNorm()
    costs = cost_model(trace(model, (torch.randn(4, 8), torch.randint(0, 3, (4,)))))
    by_name = {c.name: c for c in costs}
    (norm,) = [c for c in costs if c.name.startswith("batch_norm")]
    assert norm.bwd_flops >= 0 and norm.fwd_flops >= 0  # costed, not refused
    mask_nodes = [c for c in costs if c.name in ("gt", "float", "unsqueeze")]
    assert mask_nodes and all(c.bwd_flops == 0 and c.elementwise_flops <= 4 * 8 for c in mask_nodes)
    # the mask's product still carries a gradient to h: its backward is charged
    assert by_name["mul"].elementwise_flops == 3 * 4 * 8


def test_a_timm_model_with_batchnorm_traced_through_costs() -> None:
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10)
    traced = trace(model, (torch.empty(2, 3, 64, 64, device="meta"),), method="fx")
    costs = cost_model(traced)
    norms = [c for c in costs if c.name.startswith("batch_norm")]
    assert norms  # traced through, as a function, and costed with its backward
    assert all(c.elementwise_flops == 3 * c.output_bytes // 4 for c in norms)
    assert sum(c.bwd_flops for c in costs) > sum(c.fwd_flops for c in costs)
