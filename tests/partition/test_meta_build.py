"""A model that cannot be built under ``torch.device("meta")``: built on the CPU, and said.

Issue 18: torchvision's RegNet computes its widths with tensor ops in ``__init__``, so pipepart's
meta build failed with a bare ``FactoryError ... NotImplementedError: Cannot copy out of meta
tensor``, and no flag got past it. See [Note: building on meta].
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from partition.errors import FactoryError
from partition.models.registry import ModelSpec, build_meta_model


def regnet() -> Any:
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.regnet_y_400mf(num_classes=10), (torch.randn(4, 3, 64, 64),)


def test_regnet_is_built_on_the_cpu_moved_to_meta_and_the_log_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rng = torch.random.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="partition.models.meta_build"):
        built = build_meta_model(regnet)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the retry drew no random number
    tensors = [*built.model.parameters(), *built.model.buffers()]
    assert tensors and all(t.device.type == "meta" for t in tensors)
    assert built.args is not None and built.args[0].device.type == "meta"
    assert sum(p.numel() for p in built.model.parameters()) == sum(
        p.numel() for p in regnet()[0].parameters()
    )
    (record,) = caplog.records
    said = record.getMessage()
    assert "cannot build its model under torch.device('meta')" in said
    assert "without allocating a weight" in said  # why pipepart builds on meta
    assert "NotImplementedError: Cannot copy out of meta tensor" in said
    assert "torchvision/models/regnet.py:" in said  # where, in the model's code
    assert "building it on the CPU instead" in said and "with torch.device('cpu')" in said


def test_with_the_fallback_forbidden_the_error_says_meta_why_and_the_ways_out() -> None:
    with pytest.raises(FactoryError) as info:
        build_meta_model(regnet, cpu_fallback=False)
    assert isinstance(info.value, NotImplementedError)  # also what the factory raised
    message = str(info.value)
    assert "cannot build its model under torch.device('meta')" in message
    assert "a meta tensor has a shape but no values" in message
    assert "Ways out: build the model on the CPU inside the factory" in message


class _Widths(nn.Module):
    """Widths from tensor values in ``__init__`` (``.item()``), and a tied weight."""

    def __init__(self, fail_on_cpu: bool = False) -> None:
        super().__init__()
        width = int(torch.tensor([3.0, 5.0]).sum().item())
        if fail_on_cpu and torch.empty(0).device.type == "cpu":
            raise ValueError("no weights file")
        self.a = nn.Linear(4, width)
        self.b = nn.Linear(width, 4)
        self.c = nn.Linear(width, 4)
        self.c.weight = self.b.weight

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        return self.b(h) + self.c(h)


def widths() -> Any:
    return _Widths(), (torch.randn(4, 4),), F.mse_loss, torch.randn(4, 4)


def test_a_tied_weight_stays_tied_and_the_factory_spec_path_builds_too() -> None:
    built = build_meta_model(widths)
    assert built.model.a.out_features == 8 and built.model.c.weight is built.model.b.weight
    assert built.target.device.type == "meta" and built.loss_fn is F.mse_loss
    with torch.device("meta"):  # `pipepart plan` builds a spec under meta itself
        model, args, _, _, _ = ModelSpec(name="test_meta_build:widths").build()
    assert model.a.weight.device.type == "meta" and args[0].device.type == "meta"


def test_a_factory_that_fails_on_the_cpu_too_says_both() -> None:
    with pytest.raises(FactoryError) as info:
        build_meta_model(lambda: (_Widths(fail_on_cpu=True), (torch.randn(4, 4),)))
    message = str(info.value)
    assert "meta tensor" in message.lower() and "under torch.device('meta')" in message
    assert "Built on the CPU instead, it raised ValueError: no weights file" in message


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_model_built_on_the_cpu_trains_on_two_ranks_like_one_process() -> None:
    """Every rank, and the launcher, take the fallback; loss and every gradient as eager."""
    from pipeline.launch.run import RunOptions, run_pipeline
    from pipeline.runtime.pipeline import PipelineOptions

    result = run_pipeline(
        widths,
        RunOptions(
            ranks=2,
            steps=2,
            check=True,
            timeout=120,
            pipeline=PipelineOptions(schedule="1f1b", microbatches=2),
        ),
    )
    assert result is not None and result.check is not None and result.check.passed, result.check
    assert max(result.check.loss, result.check.grads, result.check.params) < 1e-5
