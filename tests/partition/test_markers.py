"""``pipe_split()`` markers: traced on both routes, never run by a stage, usable as the cuts.

A model written for `torch.distributed.pipelining` marks its stage boundaries with
``pipe_split()``; ``cuts="markers"`` (``--cuts markers``) takes them as the plan's cuts, and
without it the partitioner ignores them.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.pipelining import pipe_split

from partition import analyze, plan_model
from partition.devices import parse_devices
from partition.errors import PlanError
from partition.split import split
from pipeline.cli.command import main

D = 8


class Marked(nn.Module):
    """``layers`` linear layers with a ``pipe_split()`` between each two (PyTorch's style)."""

    def __init__(self, layers: int = 4, markers: list[int] | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(D, D) for _ in range(layers)])
        self.markers = list(range(1, layers)) if markers is None else markers

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            for _ in range(self.markers.count(i)):
                pipe_split()
            x = torch.relu(layer(x))
        return x


def marked(layers: int = 4) -> Any:
    """A factory for the command line: ``(model, inputs, loss_fn, target)``."""
    return Marked(layers), (torch.randn(8, D),), F.mse_loss, torch.randn(8, D)


def marked_twice() -> Any:
    return marked(2)


def _layers(analysis: Any, bounds: list[int] | tuple[int, ...]) -> list[set[str]]:
    """The ``layers.i`` each stage's nodes belong to."""
    paths = analysis.graph.module_paths
    return [
        {".".join(p.split(".")[:2]) for p in paths[lo:hi] if p.startswith("layers.")}
        for lo, hi in itertools.pairwise(bounds)
    ]


@pytest.mark.parametrize("method", ["fx", "export"])
def test_markers_are_found_and_never_run(method: str) -> None:
    model, x = Marked(), torch.randn(2, D)
    analysis = analyze(model, (x,), method=method)
    assert analysis.traced.markers == 3
    assert not [n for n in analysis.traced.graph.nodes if "pipe_split" in str(n.target)]
    n = len(analysis.graph)
    stages = split(analysis.traced, analysis.graph, [0, n // 2, n])
    assert all("pipe_split" not in stage.module.code for stage in stages)
    out = stages[1](*stages[0](x))
    assert torch.equal(out, model(x))  # the last stage returns the model's own structure


@pytest.mark.parametrize("method", ["fx", "export"])
def test_the_markers_are_the_cuts_when_asked(method: str) -> None:
    model, x = Marked(), torch.randn(8, D)
    plan = plan_model(
        model, (x,), devices=parse_devices("cpu", 4), microbatches=2, cuts="markers", method=method
    )
    analysis = analyze(model, (x,), microbatches=2, method=method, order="graph")
    assert plan.algorithm == "markers"
    assert _layers(analysis, plan.bounds) == [{f"layers.{s}"} for s in range(4)]
    interleaved = plan_model(
        model,
        (x,),
        devices=parse_devices("cpu", 2),
        microbatches=2,
        schedule="interleaved",
        virtual=2,
        cuts="markers",
        method=method,
    )
    assert interleaved.bounds == plan.bounds


def test_without_the_option_the_partitioner_ignores_the_markers() -> None:
    model, x = Marked(), torch.randn(8, D)
    plan = plan_model(model, (x,), devices=parse_devices("cpu", 2), microbatches=2)
    assert plan.algorithm == "optimal" and plan.num_stages == 2


def test_marker_cuts_need_markers_plus_one_stages() -> None:
    model, x = Marked(), torch.randn(8, D)
    with pytest.raises(PlanError, match=r"3 pipe_split.* make 4 stages.*2 device"):
        plan_model(model, (x,), devices=parse_devices("cpu", 2), microbatches=2, cuts="markers")
    with pytest.raises(PlanError, match="no pipe_split"):
        plan_model(Marked(markers=[]), (x,), devices=parse_devices("cpu", 1), cuts="markers")
    with pytest.raises(PlanError, match="segment 1 of 3 without an operation"):
        plan_model(Marked(markers=[2, 2]), (x,), devices=parse_devices("cpu", 3), cuts="markers")


def test_plan_command_takes_the_markers(capsys: pytest.CaptureFixture[str]) -> None:
    model = "tests.partition.test_markers:marked"
    argv = ["plan", model, "--devices", "4", "--microbatches", "2", "--cuts", "markers"]
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["algorithm"] == "markers" and len(data["stages"]) == 4
    assert main(["plan", model, "--devices", "3", "--cuts", "markers"]) == 2
    err = capsys.readouterr().err
    assert "make 4 stages" in err and "\n" not in err.strip()


@pytest.mark.timeout(240)
@pytest.mark.slow
def test_run_command_takes_the_markers(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", "tests.partition.test_markers:marked_twice", "--ranks", "2", "--cuts"]
    argv += ["markers", "--steps", "2", "--check", "--json", "--timeout", "60"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["step"] for s in data["steps"]] == [0, 1]
    assert data["check"]["loss"] < 1e-5 and data["check"]["grads"] < 1e-5
