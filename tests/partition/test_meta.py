"""Running graph nodes on meta: shapes equal the real run, no weight is copied, ties stay tied."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from partition.errors import TraceError
from partition.trace.meta import MetaState, fetch_args, run_node, to_meta
from partition.trace.tensor_constants import CONSTANTS


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.embed.weight
        self.norm = nn.BatchNorm1d(4)


class ItemGate(nn.Module):
    """Data-dependent: ``.item()`` cannot run on meta, so the module runs on zeros for real."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) * 2 if x.sum().item() >= 0 else self.a(x)


def test_to_meta_keeps_shape_dtype_and_grad_and_allocates_nothing() -> None:
    x = torch.randn(2, 3, requires_grad=True)
    ids = torch.arange(5)
    out = to_meta({"x": x, "rest": [ids, 3, "s"]})
    mx, mids = out["x"], out["rest"][0]
    assert (mx.device.type, mx.shape, mx.dtype, mx.requires_grad) == ("meta", (2, 3), x.dtype, True)
    assert (mids.device.type, mids.dtype) == ("meta", torch.int64) and out["rest"][1:] == [3, "s"]
    already = torch.empty(4, device="meta")
    assert to_meta(already) is already


def test_meta_state_shares_one_copy_per_tensor() -> None:
    model = Tied()
    constant = torch.ones(2)
    state = MetaState(model, {"c0": constant})
    w = state.tensor("embed.weight")
    assert w.device.type == "meta" and isinstance(w, nn.Parameter) and w.shape == (7, 4)
    assert state.tensor("head.weight") is w  # a tie stays a tie
    assert state.has("norm.running_mean") and not state.has("norm.nothing")
    assert state.tensor(f"{CONSTANTS}.c0").shape == (2,)
    assert set(state.module_state("norm")) == {
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }
    assert state.module_state("head") == {"weight": w}
    assert model.embed.weight.device.type == "cpu"  # the model is untouched


def _graph(model: nn.Module, x: torch.Tensor) -> tuple[torch.fx.GraphModule, dict[str, object]]:
    gm = torch.fx.symbolic_trace(model)
    state = MetaState(model)
    values: dict[str, object] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            values[node.name] = to_meta(x)
        elif node.op != "output":
            args, kwargs = fetch_args(node, values)
            values[node.name] = run_node(node, args, kwargs, state)
    return gm, values


def test_every_node_has_the_shape_of_the_real_run() -> None:
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Flatten(0), nn.Linear(10, 2))
    x = torch.randn(2, 3)
    gm, values = _graph(model, x)
    real: dict[str, torch.Tensor] = {}
    h = x
    for node in gm.graph.nodes:
        if node.op == "call_module":
            h = gm.get_submodule(str(node.target))(h)
            real[node.name] = h
    for name, tensor in real.items():
        meta = values[name]
        assert isinstance(meta, torch.Tensor) and meta.device.type == "meta"
        assert (meta.shape, meta.dtype) == (tensor.shape, tensor.dtype), name


def test_a_module_that_cannot_run_on_meta_runs_on_zeros() -> None:
    model = nn.Sequential(ItemGate())
    graph = torch.fx.Graph()
    y = graph.call_module("0", (graph.placeholder("x"),))
    state = MetaState(model)
    out = run_node(y, (to_meta(torch.randn(4, 3)),), {}, state)
    assert out.device.type == "meta" and out.shape == (4, 3)


def test_factory_ops_pinned_to_a_device_stay_on_meta() -> None:
    graph = torch.fx.Graph()
    node = graph.call_function(torch.arange, (5,), {"device": torch.device("cpu")})
    out = run_node(node, (5,), {"device": torch.device("cpu")}, MetaState(nn.Module()))
    assert out.device.type == "meta" and out.shape == (5,)


def test_placeholders_are_not_run() -> None:
    graph = torch.fx.Graph()
    node = graph.placeholder("x")
    with pytest.raises(TraceError, match="cannot run node x of op 'placeholder' on meta"):
        run_node(node, (), {}, MetaState(nn.Module()))
