"""Carrying a split over to the model's other mode (`partition.modes.split.modal_stages`).

Each case splits the train graph, carries the cuts over to the eval graph, and runs the eval
stages in sequence against the user's model in eval mode; `tests/pipeline/test_modes.py` runs
the same through a pipeline on ranks.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from partition import plan_analysis, plan_model
from partition.devices import parse_devices
from partition.errors import PlanError, TraceError
from partition.graph import node_order
from partition.modes.modal import ModalStage, bind_other_mode, stage_module, trace_modes
from partition.modes.split import modal_stages
from partition.options import PlanOptions
from partition.planning.analysis import analyze, stages_for_plan
from partition.solve import solve
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


# --- planning both modes together (issue 18, items 1, 4 and 8b) -------------------------------


class InPlaceThenTrainOnly(nn.Module):
    """``SiLU(inplace=True)`` then an op of train mode only, as in torchvision's EfficientNet
    (``StochasticDepth`` reads ``self.training``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.act, self.b = nn.Linear(4, 4), nn.SiLU(inplace=True), nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.a(x))  # silu_ writes a's output: the tensor crossing a cut after it
        if self.training:
            h = h * 0.5
        return self.b(h) + x


class TrainOnlyTensor(nn.Module):
    """A tensor only train mode makes is live across the middle: cuts there have no partner."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.aux, self.b = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        extra = self.aux(h) if self.training else None
        h = self.b(torch.relu(h))
        return h + extra.mean() if extra is not None else h


class FrozenNorm(nn.Module):
    """BatchNorm in a model its factory puts in eval mode; on the export route only the train
    graph reads ``num_batches_tracked``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class AuxHead(nn.Module):
    """A train-mode-only head that cannot run at small images (Inception v3's aux head)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc, self.aux = nn.Conv2d(3, 4, 1), nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        out = self.fc(h.mean((2, 3)))
        if self.training:  # a 5x5 pool at stride 3: no output below 5x5 pixels
            out = out + self.aux(F.avg_pool2d(h, kernel_size=5, stride=3).mean((2, 3)))
        return out


def _every_cut(model: nn.Module, x: Tensor, method: str = "fx") -> tuple[list[bool], list[bool]]:
    """For each interior cut of the planned order: whether `mode_cuts` accepts it, and whether
    `modal_stages` (with the weights bound) does."""
    analysis = analyze(model, (x,), method=method)  # type: ignore[arg-type]
    assert analysis.other is not None and analysis.mode_cuts is not None
    n = len(analysis.graph)
    truth = []
    for j in range(1, n):
        try:
            stages = modal_stages(
                analysis.traced, analysis.other, split(analysis.traced, analysis.graph, [0, j, n])
            )
            for stage in stages:
                bind_other_mode(stage, [stage.module])
            truth.append(True)
        except PlanError as e:
            assert "internal error" not in str(e), (j, e)
            truth.append(False)
    return list(analysis.mode_cuts.valid[1:n]), truth


@pytest.mark.parametrize(
    ("cls", "method", "refused"),
    [
        (Reordered, "fx", 0),
        (TrainOnlyMiddle, "fx", 0),  # refused in pairs only: see the next tests
        (TrainOnlyTensor, "fx", 4),
        (InPlaceThenTrainOnly, "fx", 1),
        (FrozenNorm, "export", 0),
    ],
)
def test_mode_cuts_accept_exactly_the_cuts_the_pairing_accepts(
    cls: type, method: str, refused: int
) -> None:
    model = cls()
    if cls is FrozenNorm:
        model.eval()
    x = torch.randn(2, 3, 6, 6) if cls is FrozenNorm else torch.randn(2, 4)
    claimed, truth = _every_cut(model, x, method)
    assert claimed == truth
    assert truth.count(False) == refused


def test_a_cut_right_after_an_in_place_op_pairs_the_tensor_it_wrote() -> None:
    """Issue 18 item 4: `_live` named the boundary tensor after ``silu_``, `split` the tensor it
    overwrote, and every such cut was an internal error."""
    model, x = InPlaceThenTrainOnly(), torch.randn(3, 4)
    traced, other, stages = _split(model, x, ["mul"])  # cut between silu_ and the train-only mul
    assert [s.name for s in stages[1].inputs] == ["x", "a"]  # a's output, which silu_ wrote
    carried = modal_stages(traced, other, stages)
    model.eval()
    with torch.no_grad():
        assert torch.equal(_chain(carried, x, False), model(x))
        model.train()
        assert torch.equal(_chain(carried, x, True), model(x))


def test_a_tensor_only_the_other_mode_reads_is_held_by_its_stage() -> None:
    """Issue 18 item 1: a model in eval mode on the export route reads ``num_batches_tracked``
    in train mode only; the stage whose train graph updates it holds it."""
    model, x = FrozenNorm().eval(), torch.randn(2, 3, 6, 6)
    plan = plan_model(model, (x,), devices=parse_devices("cpu", 2), microbatches=1, method="export")
    assert plan.model.modes == ("eval", "train")
    traced, other = trace_modes(model, (x,), method="export")
    stages = modal_stages(traced, other, stages_for_plan(traced, plan))
    holder = [s for s in stages if "bn.num_batches_tracked" in s.params]
    assert len(holder) == 1 and "bn.num_batches_tracked" in dict(holder[0].module.named_buffers())
    for stage in stages:
        bind_other_mode(stage, [s.module for s in stages])
    reference = FrozenNorm()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        got = _chain(stages, x, True)  # train mode: batch statistics, running stats updated
        expected = reference.train()(x)
    assert torch.allclose(got, expected, atol=1e-6)
    assert int(model.bn.num_batches_tracked) == 1 == int(reference.bn.num_batches_tracked)


def test_the_planner_cuts_only_where_both_modes_agree() -> None:
    """The unrestricted optimum of `TrainOnlyMiddle` on 3 devices has a stage of train-only
    nodes, which the pairing refuses; planning both modes picks cuts that carry over."""
    model, x = TrainOnlyMiddle(), torch.randn(4, 4)
    analysis = analyze(model, (x,), method="fx")
    devices = parse_devices("cpu", 3)
    assert analysis.other is not None and analysis.mode_cuts is not None
    unrestricted = solve(analysis.graph, devices, microbatches=1)
    assert not analysis.mode_cuts.accepts(unrestricted.bounds)
    with pytest.raises(PlanError):
        modal_stages(
            analysis.traced,
            analysis.other,
            split(analysis.traced, analysis.graph, unrestricted.bounds),
        )
    plan = plan_analysis(analysis, devices, PlanOptions(microbatches=1))
    assert analysis.mode_cuts.accepts(plan.bounds)
    assert plan.model.modes == ("train", "eval")
    carried = modal_stages(analysis.traced, analysis.other, stages_for_plan(analysis.traced, plan))
    model.eval()
    with torch.no_grad():
        assert torch.equal(_chain(carried, x, False), model(x))


def test_one_mode_is_traced_when_asked_and_the_other_is_refused_by_name() -> None:
    model, x = TrainOnlyMiddle().eval(), torch.randn(2, 4)
    plan = plan_model(model, (x,), devices=parse_devices("cpu", 2), microbatches=1, modes="eval")
    assert plan.model.modes == ("eval",)
    traced, other = trace_modes(model, (x,), modes="eval")
    assert other is not None and other.traced is None and other.mode is True
    stages = modal_stages(traced, other, stages_for_plan(traced, plan))
    with torch.no_grad():
        assert torch.equal(_chain(stages, x, False), model(x))
    with pytest.raises(PlanError, match=r"traced eval mode only \(modes='eval'\).*--modes both"):
        stage_module(stages[0], True)
    with pytest.raises(PlanError, match=r"modes='train' traces train mode only, but the model is"):
        trace_modes(model, (x,), modes="train")


def test_an_other_mode_that_cannot_trace_says_pipepart_traced_it_and_how_to_trace_one() -> None:
    """Issue 18 item 8(b): Inception v3's aux head at 75 px, in miniature."""
    model, x = AuxHead().eval(), torch.randn(2, 3, 4, 4)
    with pytest.raises(TraceError) as info:
        plan_model(model, (x,), devices=parse_devices("cpu", 2), microbatches=1)
    first = str(info.value).splitlines()[0]  # what the command line shows
    assert first.startswith(
        "pipepart also traced the model in train mode, because its forward reads "
        "self.training ('(the model)')"
    )
    assert "plan with modes='eval' (--modes eval)" in first
    plan = plan_model(model, (x,), devices=parse_devices("cpu", 2), microbatches=1, modes="eval")
    assert plan.model.modes == ("eval",)
