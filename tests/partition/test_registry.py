"""Model specs: bundled names, ``module:callable`` factories, what a factory may return, losses."""

from __future__ import annotations

import functools
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from partition.errors import FactoryError, InputError, PlanError
from partition.models.examples import lm_loss
from partition.models.registry import (
    BUNDLED,
    BuiltModel,
    OutputLoss,
    build_meta_model,
    call_factory,
    default_loss,
    factory_name,
    normalise,
    resolve,
    target_free,
    unpack_model,
)


def tiny() -> Any:
    """A factory for ``tests.partition.test_registry:tiny``."""
    return nn.Linear(3, 2), torch.randn(4, 3)


NOT_CALLABLE = 3


def test_bundled_models_come_with_inputs_a_loss_and_a_target() -> None:
    assert set(BUNDLED) == {"gpt", "gpt-tied", "skipnet", "two-tower"}
    built = resolve("gpt", size="toy", batch=3, seq=5).build()
    model, args, kwargs, loss_fn, target = built
    assert args[0].shape == (3, 5) and kwargs == {} and loss_fn is lm_loss
    assert target.shape == (3, 5) and target.dtype == torch.long
    assert int(target.min()) >= 0 and int(target.max()) < model.config.vocab_size
    loss = loss_fn(model(*args), target)  # a target the loss takes
    assert loss.shape == () and torch.isfinite(loss)
    tied = resolve("gpt-tied", batch=1).build().model
    assert tied.lm_head.weight is tied.wte.weight
    for name in ("skipnet", "two-tower"):
        b = resolve(name, batch=2).build()
        assert b.target.shape == b.args[0].shape


def test_a_spec_builds_on_meta_without_memory() -> None:
    spec = resolve("gpt", size="1b", batch=2, seq=8)
    built = build_meta_model(spec.build)
    assert all(p.device.type == "meta" for p in built.model.parameters())
    assert built.target.device.type == "meta"


def test_a_module_callable_factory() -> None:
    built = resolve("tests.partition.test_registry:tiny", batch=4).build()
    assert isinstance(built.model, nn.Linear) and built.args is not None
    assert built.args[0].shape == (4, 3) and isinstance(built.loss_fn, OutputLoss)
    with pytest.raises(InputError, match="cannot import 'no_such_module' for model"):
        resolve("no_such_module:f")
    with pytest.raises(InputError, match="has no callable 'NOT_CALLABLE'"):
        resolve("tests.partition.test_registry:NOT_CALLABLE")


def test_an_unknown_name_lists_the_forms() -> None:
    with pytest.raises(InputError) as info:
        resolve("bert")
    message = str(info.value)
    assert "unknown model 'bert'" in message and "gpt, gpt-tied, skipnet, two-tower" in message
    assert "hf:NAME" in message and "package.module:callable" in message
    with pytest.raises(InputError, match="batch must be at least 1, got 0"):
        resolve("gpt", batch=0)


def test_what_a_factory_may_return() -> None:
    model, x, target = nn.Linear(2, 2), torch.zeros(1, 2), torch.ones(1, 2)
    mse = torch.nn.functional.mse_loss
    assert normalise("f", (model, x)).args == (x,)
    assert normalise("f", (model, [x, x])).args == (x, x)
    as_kwargs = normalise("f", (model, {"input": x}))
    assert as_kwargs.args == () and as_kwargs.kwargs == {"input": x}
    given = normalise("f", (model, (x,), mse, target))
    assert given.loss_fn is mse and given.target is target
    # a loss of the output alone is wrapped so every loss is called as loss_fn(output, target)
    alone = normalise("f", (model, (x,), lambda out: out.sum()))
    assert target_free(alone.loss_fn) and float(alone.loss_fn(torch.ones(3), None)) == 3.0
    assert not target_free(normalise("f", (model, (x,), mse)).loss_fn)
    with pytest.raises(
        InputError, match=r"model factory 'f' returned list; it must return \(model"
    ):
        normalise("f", [model, x])
    with pytest.raises(InputError, match="model factory 'f' returned a str as the model"):
        normalise("f", ("model", x))
    assert unpack_model(model).model is model and unpack_model(given) is given


def test_the_default_loss() -> None:
    out = (torch.tensor([1.0, 3.0]), [torch.tensor([2.0])], torch.tensor([7]))  # ints skipped
    assert float(default_loss(out)) == (1 + 9) / 2 + 4  # mean square per tensor, summed
    own = torch.tensor(0.5)
    assert default_loss(SimpleNamespace(loss=own)) is own  # a transformers output
    assert default_loss({"loss": own, "logits": torch.ones(2)}) is own
    with pytest.raises(InputError, match="no floating-point tensor"):
        default_loss({"ids": torch.tensor([1])})
    assert repr(OutputLoss(default_loss)) == "OutputLoss('default_loss')"


def _raises(path: str = "weights.bin") -> Any:
    raise FileNotFoundError(path)


def test_a_factory_that_raises_is_named_and_keeps_its_type() -> None:
    with pytest.raises(FactoryError) as info:
        call_factory(_raises, "mine", "how it was called")
    err = info.value
    assert isinstance(err, FileNotFoundError)  # `except FileNotFoundError` still catches it
    assert (
        str(err)
        == "the model factory mine raised FileNotFoundError: weights.bin (how it was called)"
    )
    assert isinstance(err.__cause__, FileNotFoundError)
    with pytest.raises(PlanError, match="unknown GPT size"):  # pipepart's own: as it is
        call_factory(resolve("gpt", size="huge").build, "gpt", "building")
    with pytest.raises(
        FactoryError, match=r"test_registry._raises raised .* torch.device\('meta'\)"
    ):
        build_meta_model(_raises)


def test_factory_names() -> None:
    assert factory_name(_raises).endswith("test_registry._raises")
    partial = functools.partial(_raises, "x.bin")
    assert factory_name(partial).endswith("test_registry._raises('x.bin')")
    assert factory_name(len) == "len"


def test_a_built_model_unpacks_in_order() -> None:
    model = nn.Linear(1, 1)
    assert list(BuiltModel(model)) == [model, (), {}, None, None]


class LossAndLogits(nn.Module):
    """Returns ``(loss, logits)``, as many training models do."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.b(torch.relu(self.a(x)))  # (B, 3)
        return logits.logsumexp(-1).mean(), logits


def loss_and_logits() -> Any:
    """A factory for ``tests.partition.test_registry:loss_and_logits``: no loss given."""
    return LossAndLogits(), (torch.randn(8, 4),)


def test_the_default_loss_on_a_tuple_led_by_a_scalar_says_what_it_trains() -> None:
    """Issue 22: ``(loss, logits)`` trained on the mean square of both, silently."""
    loss, logits = torch.tensor(2.0), torch.ones(2, 3)
    with pytest.warns(UserWarning) as said:
        got = default_loss((loss, logits))
    assert float(got) == 4.0 + 1.0  # the semantics stay: the mean square of every output
    (warning,) = said
    text = str(warning.message)
    assert "the model returns a tuple whose first element is a scalar (a loss?)" in text
    assert "the mean square of every floating-point output" in text
    assert "return (model, inputs, lambda out: out[0])" in text and "Pipeline(loss_fn=" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: not led by a scalar, or its own loss
        default_loss((logits, loss))
        default_loss(SimpleNamespace(loss=loss, logits=logits))


RANKS = ("--ranks", "2", "--steps", "2")


@pytest.mark.slow
def test_run_warns_when_it_trains_a_loss_and_logits_model_on_the_default_loss() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "run",
            "tests.partition.test_registry:loss_and_logits",
            *RANKS,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=Path(__file__).parents[2],
    )
    assert done.returncode == 0, done.stderr
    assert (
        "whose first element is a scalar (a loss?), and no loss function was given" in done.stderr
    )
