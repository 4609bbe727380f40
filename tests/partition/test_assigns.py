"""A forward that assigns a module attribute: named, put back, and the ways out work.

Issue 22: ``self.count += 1`` on a buffer failed with ``TraceError: ... NameError: parameter is
not a member of this module`` (by then, fx had left a proxy in the model's buffer, and costing
that buffer ran away with memory). See [Note: attributes assigned in forward].
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from partition import analyze
from partition.errors import TraceError
from partition.split import split
from partition.trace.fx import trace


class Counter(nn.Module):
    def __init__(self, in_place: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("count", torch.zeros(()))
        self.in_place = in_place

    def forward(self, x: Tensor) -> Tensor:
        if self.in_place:
            self.count.add_(1)
        else:
            self.count += 1
        return self.fc(x) * self.count


class Outer(nn.Module):
    def __init__(self, in_place: bool = False) -> None:
        super().__init__()
        self.inner = Counter(in_place)
        self.head = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.inner(x))


class Keeps(nn.Module):
    """Stores a tensor on itself, for a look after the step."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        self.last = x.detach()
        return self.fc(x)


def test_fx_names_the_buffer_its_module_and_the_ways_out_and_puts_it_back() -> None:
    model = Outer()
    count = model.inner.count
    with pytest.raises(TraceError) as info:
        trace(model, (torch.randn(2, 4),), method="fx")
    message = str(info.value)
    assert "forward assigns the buffer 'count' of module 'inner' (Counter)" in message
    assert "pipepart cannot split it" in message
    assert "`self.count.add_(1)`" in message and "register_buffer" in message
    assert "keep the assignment out of forward" in message
    assert "leaf_modules=['inner'] / --leaf inner" in message and "--trace export" in message
    assert model.inner.count is count and float(count) == 0  # the model as it was


def test_fx_names_a_plain_attribute_and_leaves_none_behind() -> None:
    model = Keeps()
    with pytest.raises(TraceError, match=r"assigns the attribute 'last' of the model \(Keeps\)"):
        trace(model, (torch.randn(2, 4),), method="fx")
    assert not hasattr(model, "last")


def _run_twice(model: nn.Module, method: str) -> tuple[str, Tensor]:
    x = torch.randn(2, 4)
    analysis = analyze(model, (x,), method=method)
    n = len(analysis.graph)
    first, second = split(analysis.traced, analysis.graph, [0, n // 2, n])
    outs = [second(*_as_tuple(first(x))) for _ in range(2)]
    return analysis.traced.method, outs[-1]


def _as_tuple(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


@pytest.mark.parametrize("method", ["fx", "export"])
def test_the_in_place_update_the_error_advises_is_split_and_run(method: str) -> None:
    torch.manual_seed(0)
    model = Outer(in_place=True)
    torch.manual_seed(0)
    eager = Outer(in_place=True)
    x = torch.randn(2, 4)
    traced_method, _ = _run_twice(model, method)
    assert traced_method == method and float(model.inner.count) == 2  # each forward added 1
    eager(x), eager(x)
    assert float(eager.inner.count) == 2


def test_auto_traces_a_buffer_assignment_through_export_which_keeps_it() -> None:
    """The fx route refuses; export records ``self.count += 1`` as an in-place copy."""
    model = Outer()
    method, _ = _run_twice(model, "auto")
    assert method == "export" and float(model.inner.count) == 2


@pytest.mark.filterwarnings("ignore:The tensor attribute self.last was assigned")  # torch's
def test_export_warns_of_an_attribute_it_drops_and_puts_it_back() -> None:
    model = Keeps()
    with pytest.warns(UserWarning, match=r"assigns the attribute 'last' of the model \(Keeps\)"):
        traced = trace(model, (torch.randn(2, 4),), method="export")
    assert traced.method == "export" and not hasattr(model, "last")
