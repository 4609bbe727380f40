"""What crosses a cut: the wires into each stage worked out by hand, their specs, and refusals."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from partition.errors import PlanError
from partition.graph import node_order
from partition.trace.fx import trace
from partition.wires import TensorSpec, live_tensors, local_nodes, tensor_paths, wire_name


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.a(x)
        y = torch.relu(h)
        return self.b(y) * mask.size(-1) + x, h.detach()


class InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        r = h.relu_()  # the tensor it wrote: h itself
        return self.b(r) + h


class Box:
    """Not a tensor: what a model may pass between its parts."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


@torch.fx.wrap
def boxed(t: torch.Tensor) -> Box:
    return Box(t)


class BoxNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        box = boxed(self.a(x))
        return self.b(box.t + torch.relu(x))


def _wires(model: nn.Module, inputs: tuple[Any, ...], bounds: list[int]) -> list[list[str]]:
    traced = trace(model, inputs, method="fx")
    by_name = {n.name: n for n in traced.graph.nodes}
    order = [by_name[name] for name in node_order(traced, "graph").names]
    return [[wire_name(w) for w in live] for live in live_tensors(traced, order, bounds)]


def test_the_wires_into_each_stage_worked_by_hand() -> None:
    # order: x mask a relu b size mul add detach; x is used by add (7), mask by size (5),
    # a by relu and detach (8), b by mul (6), and size, an int, by mul.
    inputs = (torch.randn(2, 4), torch.ones(2, 3))
    assert _wires(Residual(), inputs, [0, 3, 5, 9]) == [
        ["x", "mask"],  # every model input enters at stage 0
        ["x", "mask", "a"],  # the residual and the mask pass through
        ["x", "mask", "a", "b"],  # relu is used up by b; mask still by size at cut 5
    ]
    # At cut 6 mask is used up, and size crosses as no wire: an int is rebuilt, never sent.
    assert _wires(Residual(), inputs, [0, 6, 9]) == [["x", "mask"], ["x", "a", "b"]]


def test_tensors_sharing_storage_cross_as_one() -> None:
    # order: x a relu_ b add. Without folding, a (used by add) and relu_ (used by b) would both
    # cross the cut before b; relu_ is a itself, so a crosses once.
    assert _wires(InPlace(), (torch.randn(2, 4),), [0, 3, 5]) == [["x"], ["a"]]


def test_a_value_that_cannot_cross_is_refused_with_the_way_out() -> None:
    # order: x a boxed getattr relu add b; the Box made by boxed is used by getattr (3).
    with pytest.raises(PlanError) as info:
        _wires(BoxNet(), (torch.randn(2, 4),), [0, 3, 7])
    message = str(info.value)
    assert "'boxed' (a Box" in message and "only tensors" in message
    assert "Cut before 'boxed' or after 'getattr_1'" in message
    assert _wires(BoxNet(), (torch.randn(2, 4),), [0, 2, 7]) == [["x"], ["x", "a"]]  # before it


def test_parameters_and_attributes_never_cross() -> None:
    traced = trace(Residual(), (torch.randn(2, 4), torch.ones(2, 3)), method="export")
    local = local_nodes(traced)
    assert local and local == {
        n.name for n in traced.graph.nodes if n.name in traced.param_placeholders
    } | {n.name for n in traced.graph.nodes if n.op == "get_attr"}
    by_name = {n.name: n for n in traced.graph.nodes}
    order = [by_name[name] for name in node_order(traced, "graph").names]
    for live in live_tensors(traced, order, [0, len(order) // 2, len(order)]):
        assert not {node.name for node, _ in live} & local


def test_tensor_paths_find_every_tensor_in_nested_tuples_and_lists() -> None:
    t = torch.zeros(1)
    value = (t, [1, (t, None)], "s", [t])
    assert tensor_paths(value) == [(0,), (1, 1, 0), (3, 0)]
    assert tensor_paths(t) == [()] and tensor_paths(3) == []


@pytest.mark.parametrize(
    ("shape", "dtype"), [((2, 3), torch.float32), ((5,), torch.bfloat16), ((), torch.int64)]
)
def test_a_spec_knows_its_bytes_and_round_trips(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    tensor = torch.zeros(shape, dtype=dtype)
    spec = TensorSpec.of("h", tensor)
    assert spec.nbytes == tensor.numel() * tensor.element_size()
    assert spec.torch_dtype == dtype and spec.shape == shape
    assert TensorSpec.from_dict(spec.to_dict()) == spec
    assert spec.describe() == f"h: {str(dtype).removeprefix('torch.')}{list(shape)}"
