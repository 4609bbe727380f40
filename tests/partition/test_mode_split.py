"""Carrying a split over to the model's other mode (`partition.modes.split.modal_stages`).

Each case splits the train graph, carries the cuts over to the eval graph, and runs the eval
stages in sequence against the user's model in eval mode; `tests/pipeline/test_modes.py` runs
the same through a pipeline on ranks.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from partition.errors import PlanError
from partition.graph import node_order
from partition.modes.modal import ModalStage, stage_module, trace_modes
from partition.modes.split import modal_stages
from partition.split import Stage, split
from partition.trace.traced import TracedModel


class Reordered(nn.Module):
    """Two tensors cross the middle; in train mode the first is remade after the second."""

    def __init__(self) -> None:
        super().__init__()
        self.p, self.q = nn.Linear(4, 4), nn.Linear(4, 6)
        self.r, self.s = nn.Linear(4, 3), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        u = self.p(x)
        v = self.q(x)
        if self.training:
            u = u * 2  # train mode sends (q, mul) across the cut, eval mode (p, q)
        return self.r(u) + self.s(v)


class TrainOnlyMiddle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        if self.training:
            h = h * 2 + 1  # two nodes eval mode does not have
        return self.b(h)


class ShorterInEval(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        return h if self.training else h[:, :2]


def _split(model: nn.Module, x: Tensor, cuts: list[str]) -> tuple[TracedModel, Any, list[Stage]]:
    """The train graph split before each node named in ``cuts``."""
    traced, other = trace_modes(model, (x,), method="fx")
    graph = node_order(traced, "graph")
    bounds = [0, *(graph.names.index(c) for c in cuts), len(graph)]
    return traced, other, split(traced, graph, bounds)


def _chain(stages: list[Stage], x: Tensor, mode: bool) -> Tensor:
    values: Any = (x,)
    with torch.no_grad():
        for stage in stages:
            values = stage_module(stage, mode)(*values)
    return values[0] if isinstance(values, (tuple, list)) else values


def test_tensors_sent_in_another_order_are_paired_and_reordered() -> None:
    model, x = Reordered(), torch.randn(5, 4)
    traced, other, stages = _split(model, x, ["r"])
    assert other is not None and other.mode is False
    carried = modal_stages(traced, other, stages)
    assert all(isinstance(s, ModalStage) and s.traced_mode for s in carried)
    # mul (train only) pairs with p through their common reader r: the eval stage 1 takes
    # (q, p) in the train stage's order, and the eval stage 0 returns them in that order
    assert [s.name for s in carried[1].inputs] == ["q", "mul"]
    other_1 = carried[1].other
    assert other_1 is not None
    assert [n.name for n in other_1.graph.nodes if n.op == "placeholder"] == ["q", "p"]
    model.eval()
    with torch.no_grad():
        expected = model(x)
    assert torch.equal(_chain(carried, x, False), expected)
    model.train()
    with torch.no_grad():
        assert torch.equal(_chain(carried, x, True), model(x))


def test_without_another_mode_the_stages_are_returned_as_they_are() -> None:
    model, x = nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.randn(2, 4)
    traced, other, stages = _split(model, x, ["_1"])
    assert other is None
    assert modal_stages(traced, None, stages) == stages


def test_a_stage_of_train_only_nodes_is_refused_with_the_fix() -> None:
    traced, other, stages = _split(TrainOnlyMiddle(), torch.randn(2, 4), ["mul", "b"])
    assert [len(s.nodes) for s in stages][1] == 2  # mul and add, train mode only
    with pytest.raises(PlanError, match=r"stage 1 has no nodes in eval mode .* train-only"):
        modal_stages(traced, other, stages)
    # a cut before the train-only part carries over: the eval stage 1 is b alone
    model, x = TrainOnlyMiddle(), torch.randn(2, 4)
    traced, other, stages = _split(model, x, ["mul"])
    carried = modal_stages(traced, other, stages)
    model.eval()
    with torch.no_grad():
        assert torch.equal(_chain(carried, x, False), model(x))


def test_outputs_that_differ_between_modes_are_named() -> None:
    traced, other, stages = _split(ShorterInEval(), torch.randn(3, 4), [])
    with pytest.raises(PlanError) as info:
        modal_stages(traced, other, stages)
    message = str(info.value)
    assert "the model's outputs differ between modes" in message
    assert "float32[3, 4]] in train mode" in message and "float32[3, 2]] in eval mode" in message
