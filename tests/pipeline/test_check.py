"""``pipepart run --check`` is independent, compares like with like, and fails when it should.

See [Note: an independent check] in `pipeline.launch.reference`. The models are given to the command line
as ``tests.pipeline.test_check:NAME`` (``package.module:callable``), as a user would.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.cli.command import main
from pipeline.launch.job import RankResult
from pipeline.launch.reference import Reference, compare

MODULE = "tests.pipeline.test_check"


class Mlp(nn.Module):
    def __init__(self, poison: bool = False) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 8)
        if poison:  # the factory's own weights hold a NaN: both sides see it
            with torch.no_grad():
                self.b.weight[0, 0] = float("nan")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _x(batch: int = 8) -> torch.Tensor:
    return torch.randn(batch, 8, generator=torch.Generator().manual_seed(1))


def _on(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, device="meta") if model.a.weight.is_meta else x


def poisoned() -> Any:
    model = Mlp(poison=True)
    x = _on(model, _x())
    return model, (x,), F.mse_loss, torch.zeros_like(x)


def bare() -> Any:
    """``(model, inputs)``: no loss, no target (the default loss)."""
    model = Mlp()
    return model, (_on(model, _x()),)


def output_only() -> Any:
    """A ``loss_fn(output)`` of the output alone: no target."""
    model = Mlp()
    return model, (_on(model, _x()),), lambda out: out.abs().mean()


def summed() -> Any:
    model = Mlp()
    x = _on(model, _x())
    return model, (x,), lambda out, y: F.mse_loss(out, y, reduction="sum"), torch.zeros_like(x)


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def conv_bn() -> Any:
    """BatchNorm in train mode: the conv bias's gradient cancels (rounding noise on both sides)."""
    model = ConvBN()
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    x = torch.empty_like(x, device="meta") if model.conv.weight.is_meta else x
    return model, (x,), F.cross_entropy, torch.arange(8, device=x.device) % 4


def _run(capsys: pytest.CaptureFixture[str], name: str, *extra: str) -> tuple[int, dict[str, Any]]:
    argv = ["run", f"{MODULE}:{name}", "--ranks", "2", "--steps", "2", "--microbatches", "2"]
    code = main([*argv, "--check", "--json", "--timeout", "60", *extra])
    out = capsys.readouterr().out
    return code, json.loads(out)


@pytest.mark.timeout(120)
def test_a_nan_fails_the_check_and_is_reported_as_nan(capsys: pytest.CaptureFixture[str]) -> None:
    code, result = _run(capsys, "poisoned")
    assert code == 1
    check = result["check"]
    assert check["passed"] is False
    assert check["loss"] == "nan" and check["grads"] == "nan"  # never 0.0


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("bare", ()),
        ("output_only", ()),
        ("summed", ("--loss", "sum")),  # like with like: the reference sums its micro-batches too
        ("summed", ("--loss", "sum", "--optimizer", "adam")),
        ("conv_bn", ()),  # running statistics per micro-batch, as the reference's
        ("conv_bn", ("--batchnorm", "batch")),  # the whole batch's, as the reference's
    ],
)
def test_factories_the_help_promises_train_and_pass(
    capsys: pytest.CaptureFixture[str], name: str, extra: tuple[str, ...]
) -> None:
    code, result = _run(capsys, name, *extra)
    check = result["check"]
    assert code == 0, check["failures"]
    assert check["passed"] and all(isinstance(check[k], float) for k in ("loss", "grads", "params"))
    assert check["loss"] <= 1e-5 and check["grads"] <= 1e-5
    assert set(result["weights"]["0"]) == {"factory"}
    if name != "conv_bn":  # the step-0 loss is the eager model's own, computed here
        assert math.isclose(result["steps"][0]["loss"], _step0(name), rel_tol=1e-5)


@torch.no_grad()
def _step0(name: str) -> float:
    torch.manual_seed(0)
    built = globals()[name]()
    model, (x,) = built[0], built[1]
    chunks = x.tensor_split(2)
    if name == "bare":
        return sum(float(model(c).pow(2).mean()) for c in chunks) / 2
    if name == "output_only":
        return sum(float(model(c).abs().mean()) for c in chunks) / 2
    out = torch.cat([model(c) for c in chunks])
    return float(F.mse_loss(out, torch.zeros_like(out), reduction="sum"))


def _reference(**changes: Any) -> Reference:
    ref = Reference(
        losses=[1.0, 0.5],
        params={"w": torch.ones(3)},
        grads={"w": torch.full((3,), 0.1)},
        buffers={},
        canonical={"w": "w", "tied": "w"},
    )
    for k, v in changes.items():
        setattr(ref, k, v)
    return ref


def _rank(**changes: Any) -> RankResult:
    fields: dict[str, Any] = {
        "losses": [1.0, 0.5],
        "params": {"w": torch.ones(3)},
        "grads": {"w": torch.full((3,), 0.1)},
        **changes,
    }
    return RankResult(
        rank=0, stages=[0], microbatches=2, times=[], timelines=[], weights=[], **fields
    )


def test_compare_is_relative_and_treats_non_finite_as_failure() -> None:
    assert compare([_rank()], _reference()).passed
    assert compare([_rank(grads={"tied": torch.full((3,), 0.1)})], _reference()).passed  # alias
    off = compare([_rank(grads={"w": torch.full((3,), 0.1 + 1e-3)})], _reference())
    assert not off.passed and math.isclose(off.grads, 1e-2, rel_tol=1e-4)
    assert compare(
        [_rank(grads={"w": torch.full((3,), 0.1 + 1e-3)})], _reference(), tolerance=0.1
    ).passed
    nan = compare([_rank(losses=[math.nan, 0.5])], _reference())
    assert not nan.passed and math.isnan(nan.loss)
    both_nan = compare(
        [_rank(params={"w": torch.full((3,), math.nan)})],
        _reference(params={"w": torch.full((3,), math.nan)}),
    )
    assert not both_nan.passed and math.isnan(both_nan.params)  # NaN - NaN is not 0
    missing = compare([_rank(grads={})], _reference())
    assert not missing.passed and math.isinf(missing.grads)  # a gradient nobody reported
