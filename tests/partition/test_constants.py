"""Tensor constants reach the stages that read them, on both trace routes, bit for bit.

Issue 9: a tensor default argument (``forward(self, x, y=torch.zeros(B, D))``) crashed every rank
with ``NameError: name '_tensor_constant0' is not defined``. Here a model reads every kind of
constant — a default argument, a plain tensor attribute, a tensor made in ``forward``, plus a
non-persistent buffer — and is split at every cut.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from partition import analyze
from partition.errors import PlanError, TraceError
from partition.split import split
from partition.trace.fx import trace

D = 6
_DEFAULT = torch.linspace(-1.0, 1.0, D)  # made when the class is defined


class _Rotary(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("inv_freq", torch.arange(D, dtype=torch.float32), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.inv_freq.cos()


class Constants(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.rotary = nn.Linear(D, D), nn.Linear(D, D), _Rotary()
        self.scale = torch.rand(D) + 0.5  # a plain attribute, not a buffer

    def forward(self, x: Tensor, y: Tensor = _DEFAULT) -> Tensor:
        h = torch.tanh(self.fc1(x)) + y
        h = h * self.scale
        h = self.rotary(h)
        h = h + torch.tensor([0.5] * D)  # made in forward
        return self.fc2(h) * y


def _run(stages: list, x: Tensor) -> Tensor:  # type: ignore[type-arg]
    values: tuple[Tensor, ...] = (x,)
    for stage in stages:
        out = stage(*values)
        values = out if isinstance(out, tuple) else (out,)
    return values[0]


@pytest.mark.parametrize("method", ["fx", "export"])
def test_every_cut_gives_the_models_output_bit_for_bit(method: str) -> None:
    model, x = Constants(), torch.randn(3, D)
    expected = model(x)
    analysis = analyze(model, (x,), method=method)
    assert len(analysis.traced.constants) == 3  # the default, the attribute, the literal
    n = len(analysis.graph)
    for cut in range(1, n):
        stages = split(analysis.traced, analysis.graph, [0, cut, n])
        assert torch.equal(_run(stages, x), expected), f"{method}, cut {cut}"
        for stage in stages:
            assert not any("_pipepart_constants" in k for k in stage.module.state_dict())
            assert not any("_pipepart_constants" in k for k, _ in stage.module.named_buffers())
            assert "rotary.inv_freq" not in stage.module.state_dict()  # non-persistent stays so
    assert "rotary.inv_freq" not in model.state_dict()  # and the model's own flag is untouched


def test_fx_leaves_no_constant_on_the_users_model() -> None:
    model = Constants()
    trace(model, (torch.randn(3, D),), method="fx")
    assert not [k for k in vars(model) if k.startswith("_tensor_constant")]


def test_constants_survive_allocation_and_keep_their_dtype() -> None:
    model, x = Constants(), torch.randn(3, D)
    analysis = analyze(model, (x,), method="fx")
    (stage,) = split(analysis.traced, analysis.graph, [0, len(analysis.graph)])
    before = {k: v.clone() for k, v in stage.module._pipepart_constants.values().items()}
    stage.module.to_empty(device="cpu")  # what a rank does before it loads the weights
    stage.module.double()
    after = stage.module._pipepart_constants.values()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in after)
    assert all(v.dtype == torch.float32 for v in after.values())  # as eager keeps a default's


def test_a_plain_attribute_of_a_meta_model_says_to_register_it() -> None:
    with torch.device("meta"):
        model = Constants()
    analysis = analyze(model, (torch.randn(3, D),), method="fx")
    (stage,) = split(analysis.traced, analysis.graph, [0, len(analysis.graph)])
    with pytest.raises(PlanError, match=r"'scale'.*register_buffer"):
        stage.module.to_empty(device="cpu")


class _Tupled(nn.Module):
    def forward(self, x: Tensor, ys: tuple[Tensor, ...] = (torch.zeros(D),)) -> Tensor:
        return x + ys[0]


def test_a_default_holding_tensors_in_a_tuple_is_refused_clearly() -> None:
    with pytest.raises(TraceError, match=r"'ys'.*pass ys="):
        trace(_Tupled(), (torch.randn(3, D),), method="fx")
    traced = trace(_Tupled(), (torch.randn(3, D), (torch.ones(D),)), method="fx")
    assert traced.input_names == ("x", "ys")


class BatchDefault(nn.Module):
    """A tensor default whose first dimension is the batch, as in PyTorch's pipelining tests."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, y: torch.Tensor = torch.zeros(8, 16)) -> torch.Tensor:  # noqa: B008
        return self.b(self.a(x) + y)


def test_a_batch_sized_default_names_the_argument_and_the_way_out() -> None:
    """Issue 18, item 8: this was a bare shape-propagation error at an ``add`` node."""
    x = torch.randn(8, 16)
    with pytest.raises(TraceError, match=r"reads the default of argument 'y' \(shape \[8, 16\]\)"):
        analyze(BatchDefault(), (x,), microbatches=2, method="fx")
    analysis = analyze(BatchDefault(), (x, torch.zeros(8, 16)), microbatches=2, method="fx")
    assert [s.shape for s in analysis.inputs] == [(4, 16), (4, 16)]  # passed in: split like x
