"""Model specs by name: the bundled examples, ``hf:NAME`` models, and ``package.module:callable``.

A spec resolves to a factory returning ``(model, example_inputs)``,
``(model, example_inputs, loss_fn)`` or ``(model, example_inputs, loss_fn, target)``;
`resolve` normalises them to a `ModelSpec` whose `build` may be called under
``torch.device("meta")``. Example inputs are a tuple of positional tensors or a dict of keyword
tensors. Bundled and ``hf:`` models come with a synthetic target for training runs. A
``loss_fn(output)`` of the output alone needs no target; a factory that gives no loss gets
`default_loss` (the output's own ``loss`` if it has one, else the mean square of its outputs).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from partition.errors import InputError, PipepartError, factory_error
from partition.models import examples, meta_build

__all__ = [
    "BUNDLED",
    "BuiltModel",
    "ModelSpec",
    "OutputLoss",
    "build_meta_model",
    "default_loss",
    "normalise",
    "resolve",
    "target_free",
    "unpack_model",
]


@dataclass(frozen=True)
class BuiltModel:
    """What a model factory gave: the model, example inputs, a loss function and a target."""

    model: nn.Module
    args: tuple[Any, ...] | None = None
    """Example positional inputs for the whole batch (None if the factory gave none)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Example keyword inputs."""
    loss_fn: Callable[..., torch.Tensor] | None = None
    target: Any = None

    def __iter__(self) -> Iterator[Any]:
        """``model, args, kwargs, loss_fn, target = built`` (args ``()`` when none were given)."""
        return iter((self.model, self.args or (), self.kwargs, self.loss_fn, self.target))


def unpack_model(built: Any) -> BuiltModel:
    """Normalise what a factory returned: a module, ``(model, inputs[, loss_fn[, target]])``, or a
    `BuiltModel` (what a spec's `ModelSpec.build` gives).

    Raises:
        InputError: anything else.
    """
    if isinstance(built, BuiltModel):
        return built
    if isinstance(built, nn.Module):
        return BuiltModel(built)
    return normalise("the model factory", built)


def build_meta_model(model_fn: Callable[[], Any], *, cpu_fallback: bool = True) -> BuiltModel:
    """Call ``model_fn`` under ``torch.device("meta")``; so building the model costs no memory.

    A model that cannot be built on meta is built on the CPU and moved to meta, unless
    ``cpu_fallback`` is False (see [Note: building on meta] in `partition.models.meta_build`).

    Raises:
        FactoryError: the factory raised (also an instance of what it raised, which is the cause).
        InputError: it returned something that is not a model.
    """
    with torch.device("meta"), meta_build.cpu_fallback(cpu_fallback):
        built = call_factory(
            model_fn,
            factory_name(model_fn),
            "it was called under torch.device('meta'), to build the model without memory",
        )
        return unpack_model(built)


def call_factory(model_fn: Callable[..., Any], name: str, how: str, **kwargs: Any) -> Any:
    """``model_fn(**kwargs)``; what it raises (unless a pipepart error, which says enough) comes
    back as a `FactoryError` naming the factory and ``how`` it was called, also an instance of
    the type it raised, with the original as its cause. Under meta, a model that cannot be built
    there is built on the CPU (see [Note: building on meta] in `partition.models.meta_build`)."""
    try:
        return model_fn(**kwargs)
    except PipepartError:
        raise
    except Exception as e:
        if meta_build.meta_failure(e):  # see [Note: building on meta]
            return meta_build.on_meta_or_cpu(model_fn, name, e, kwargs)
        message = f"the model factory {name} raised {type(e).__name__}: {e} ({how})"
        raise factory_error(e, message) from e


def factory_name(model_fn: Callable[..., Any]) -> str:
    """How a message names a factory: ``module.qualname``, a partial with its arguments."""
    if isinstance(model_fn, functools.partial):
        given = [repr(a) for a in model_fn.args] + [
            f"{k}={v!r}" for k, v in model_fn.keywords.items()
        ]
        return f"{factory_name(model_fn.func)}({', '.join(given)})"
    name = getattr(model_fn, "__qualname__", None) or type(model_fn).__qualname__
    module = getattr(model_fn, "__module__", None)
    return f"{module}.{name}" if module and module not in ("__main__", "builtins") else name


def _with_target(result: Any, target: torch.Tensor) -> Any:
    return (*result, target)


def _tokens(model: Any, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    idx = inputs[0]
    if idx.device.type == "meta":
        return torch.empty_like(idx)
    return torch.randint(0, model.config.vocab_size, tuple(idx.shape))


def _like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x) if x.device.type == "meta" else torch.randn(x.shape)


def _gpt(size: str, batch: int, seq: int | None, tie_weights: bool | None = None, **kw: Any) -> Any:
    result = examples.gpt(size or "toy", batch=batch, seq=seq, tie_weights=tie_weights, **kw)
    return _with_target(result, _tokens(result[0], result[1]))


def _skipnet(size: str, batch: int, seq: int | None, **kw: Any) -> Any:
    result = examples.skipnet(batch=batch, **kw)
    return _with_target(result, _like(result[1][0]))


def _two_tower(size: str, batch: int, seq: int | None, **kw: Any) -> Any:
    result = examples.two_tower(batch=batch, **kw)
    return _with_target(result, _like(result[1][0]))


BUNDLED: dict[str, Callable[..., Any]] = {
    "gpt": _gpt,
    "gpt-tied": lambda size, batch, seq, **kw: _gpt(size, batch, seq, tie_weights=True, **kw),
    "skipnet": _skipnet,
    "two-tower": _two_tower,
}


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A named way to build a model, its example batch and its loss."""

    name: str
    size: str = ""
    batch: int = 8
    seq: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def build(self) -> BuiltModel:
        """The model, its example inputs, loss and target; call under ``torch.device("meta")`` to
        skip weights."""
        factory = _factory(self.name)
        result = call_factory(
            factory,
            self.name,
            "building the model, its inputs and its loss",
            size=self.size,
            batch=self.batch,
            seq=self.seq,
            **self.options,
        )
        return normalise(self.name, result)


def resolve(
    name: str, *, size: str = "", batch: int = 8, seq: int | None = None, **options: Any
) -> ModelSpec:
    """A `ModelSpec` for ``name``; raises `InputError` naming the accepted forms if unknown."""
    _factory(name)  # fail early with a clear message
    if batch < 1:
        raise InputError(f"batch must be at least 1, got {batch}")
    return ModelSpec(name=name, size=size, batch=batch, seq=seq, options=dict(options))


def _factory(name: str) -> Callable[..., Any]:
    if name in BUNDLED:
        return BUNDLED[name]
    if name.startswith("hf:"):
        from partition.models import hf

        return hf.factory(name[3:])
    if ":" in name:
        module_name, _, attr = name.partition(":")
        if str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise InputError(f"cannot import {module_name!r} for model {name!r}: {e}") from e
        target = getattr(module, attr, None)
        if not callable(target):
            raise InputError(f"{module_name!r} has no callable {attr!r} (model {name!r})")

        def user_factory(size: str = "", batch: int = 8, seq: int | None = None, **kw: Any) -> Any:
            return target()

        return user_factory
    raise InputError(
        f"unknown model {name!r}: use a bundled name ({', '.join(BUNDLED)}), hf:NAME "
        "(e.g. hf:gpt2), or package.module:callable returning (model, inputs[, loss_fn])"
    )


def default_loss(output: Any) -> torch.Tensor:
    """The loss of a factory that gives none: the output's own ``loss`` when it has one (a
    transformers model given labels), else the mean of the squares of its floating-point tensors
    (summed over the tensors) — a smoke-test loss that reaches every parameter."""
    own = getattr(output, "loss", None)
    if own is None and isinstance(output, dict):
        own = output.get("loss")
    if isinstance(own, torch.Tensor):
        return own
    if isinstance(output, (tuple, list)) and _is_scalar(output[0] if output else None):
        warnings.warn(
            f"the model returns a {type(output).__name__} whose first element is a scalar (a "
            "loss?), and no loss function was given: pipepart trains on the default loss, the "
            "mean square of every floating-point output, that scalar included, not on the "
            "scalar itself. To train on it, return (model, inputs, lambda out: out[0]) from the "
            "factory, or pass Pipeline(loss_fn=lambda out, target: out[0])",
            UserWarning,
            stacklevel=2,
        )
    leaves = [t for t in _leaves(output) if t.is_floating_point()]
    if not leaves:
        raise InputError("the model's output has no floating-point tensor to take a loss of")
    return sum((t.float().pow(2).mean() for t in leaves), torch.zeros((), device=leaves[0].device))


def _is_scalar(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point()


def _leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _leaves(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _leaves(v)]
    return []


class OutputLoss:
    """A loss of the output alone, called like the others as ``loss_fn(output, target)``."""

    target_free = True

    def __init__(self, fn: Callable[[Any], torch.Tensor]) -> None:
        self.fn = fn

    def __call__(self, output: Any, target: Any = None) -> torch.Tensor:
        return self.fn(output)

    def __repr__(self) -> str:
        return f"OutputLoss({getattr(self.fn, '__name__', self.fn)!r})"


def target_free(loss_fn: Any) -> bool:
    """Whether ``loss_fn`` needs no target (`OutputLoss`)."""
    return bool(getattr(loss_fn, "target_free", False))


def _takes_output_only(fn: Callable[..., Any]) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) == 1 or (
        len(positional) >= 2 and positional[1].default is not inspect.Parameter.empty
    )


def normalise(name: str, result: Any) -> BuiltModel:
    """A `BuiltModel` from what a factory returned; see the module docstring."""
    if not isinstance(result, tuple) or len(result) not in (2, 3, 4):
        raise InputError(
            f"model factory {name!r} returned {type(result).__name__}; it must return "
            "(model, example_inputs), (model, example_inputs, loss_fn) or "
            "(model, example_inputs, loss_fn, target)"
        )
    model, inputs = result[0], result[1]
    loss_fn = result[2] if len(result) >= 3 else None
    target = result[3] if len(result) == 4 else None
    if loss_fn is None:
        loss_fn = OutputLoss(default_loss)
    elif not target_free(loss_fn) and target is None and _takes_output_only(loss_fn):
        loss_fn = OutputLoss(loss_fn)
    if not isinstance(model, nn.Module):
        raise InputError(f"model factory {name!r} returned a {type(model).__name__} as the model")
    kwargs: dict[str, Any] = {}
    if isinstance(inputs, torch.Tensor):
        args: tuple[Any, ...] = (inputs,)
    elif isinstance(inputs, dict):
        args, kwargs = (), dict(inputs)
    else:
        args = tuple(inputs)
    return BuiltModel(model, args, kwargs, loss_fn, target)
