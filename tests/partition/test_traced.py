"""What tracing gives: shapes on every node from meta, module paths, and errors that say where."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from partition.errors import TraceError
from partition.trace.fx import trace
from partition.trace.traced import TracedModel, module_path, propagate_shapes


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(x)
        return self.head(h).softmax(-1)


@pytest.mark.parametrize("method", ["fx", "export"])
def test_every_node_has_the_shape_and_dtype_of_the_eager_run(method: str) -> None:
    model, x = Net(), torch.randn(3, 4)
    traced = trace(model, (x,), method=method)  # type: ignore[arg-type]
    assert isinstance(traced, TracedModel) and traced.method == method
    assert traced.input_names == ("x",) and traced.graph is traced.module.graph
    # the graph module, run for real, gives every node's value; meta gave the same shapes
    real: dict[str, torch.Tensor] = {}

    class Record(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> object:
            out = super().run_node(n)
            if isinstance(out, torch.Tensor) and n.op != "output":
                real[n.name] = out
            return out

    state = dict(model.named_parameters())
    args = [
        state[traced.param_placeholders[n.name]] if n.name in traced.param_placeholders else x
        for n in traced.graph.nodes
        if n.op == "placeholder"
    ]
    Record(traced.module).run(*args)
    for node in traced.graph.nodes:
        if node.name in real:
            val = node.meta["val"]
            assert val.device.type == "meta", node.name
            assert (val.shape, val.dtype) == (real[node.name].shape, real[node.name].dtype)
            assert node.meta["tensor_meta"].shape == val.shape
    assert torch.allclose(real[next(iter(reversed(real)))], model(x))


@pytest.mark.parametrize("method", ["fx", "export"])
def test_module_paths_are_the_users(method: str) -> None:
    traced = trace(Net(), (torch.randn(3, 4),), method=method)  # type: ignore[arg-type]
    paths = {module_path(n) for n in traced.graph.nodes} - {""}
    assert {"block.0", "block.1", "head"} <= paths


def test_a_node_that_fails_on_meta_is_named_with_its_module() -> None:
    traced = trace(Net(), (torch.randn(3, 4),), method="fx")
    with pytest.raises(TraceError) as info:
        propagate_shapes(traced, {"x": torch.randn(3, 5)})  # 5 features where 4 are taken
    message = str(info.value)
    assert "shape propagation failed at node 'block_0'" in message
    assert "in module 'block.0'" in message


def test_the_meta_state_is_made_once_from_the_model() -> None:
    traced = trace(Net(), (torch.randn(3, 4),), method="fx")
    state = traced.meta_state
    assert traced.meta_state is state and state.tensor("head.weight").device.type == "meta"
