"""Model specs by name: the bundled examples, ``hf:NAME`` models, and ``package.module:callable``.

A spec resolves to a factory returning ``(model, example_inputs)`` or
``(model, example_inputs, loss_fn)``; `resolve` normalises both to a `ModelSpec` whose `build`
may be called under ``torch.device("meta")``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from partition import examples
from partition.errors import InputError

__all__ = ["BUNDLED", "ModelSpec", "resolve"]

Built = tuple[nn.Module, tuple[Any, ...], dict[str, Any], Callable[..., torch.Tensor] | None]


def _gpt(size: str, batch: int, seq: int | None, **kw: Any) -> Any:
    return examples.gpt(size or "toy", batch=batch, seq=seq, **kw)


def _skipnet(size: str, batch: int, seq: int | None, **kw: Any) -> Any:
    return examples.skipnet(batch=batch)


def _two_tower(size: str, batch: int, seq: int | None, **kw: Any) -> Any:
    return examples.two_tower(batch=batch)


BUNDLED: dict[str, Callable[..., Any]] = {
    "gpt": _gpt,
    "gpt-tied": lambda size, batch, seq, **kw: examples.gpt(size or "toy", batch=batch, seq=seq, tie_weights=True),
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

    def build(self) -> Built:
        """``(model, args, kwargs, loss_fn)``; call under ``torch.device("meta")`` to skip weights."""
        factory = _factory(self.name)
        result = factory(size=self.size, batch=self.batch, seq=self.seq, **self.options)
        return _normalise(self.name, result)


def resolve(name: str, *, size: str = "", batch: int = 8, seq: int | None = None, **options: Any) -> ModelSpec:
    """A `ModelSpec` for ``name``; raises `InputError` naming the accepted forms if unknown."""
    _factory(name)  # fail early with a clear message
    if batch < 1:
        raise InputError(f"batch must be at least 1, got {batch}")
    return ModelSpec(name=name, size=size, batch=batch, seq=seq, options=dict(options))


def _factory(name: str) -> Callable[..., Any]:
    if name in BUNDLED:
        return BUNDLED[name]
    if name.startswith("hf:"):
        from partition import hf

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


def _normalise(name: str, result: Any) -> Built:
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise InputError(
            f"model factory {name!r} returned {type(result).__name__}; it must return "
            "(model, example_inputs) or (model, example_inputs, loss_fn)"
        )
    model, inputs = result[0], result[1]
    loss_fn = result[2] if len(result) == 3 else None
    if not isinstance(model, nn.Module):
        raise InputError(f"model factory {name!r} returned a {type(model).__name__} as the model")
    kwargs: dict[str, Any] = {}
    if isinstance(inputs, torch.Tensor):
        args: tuple[Any, ...] = (inputs,)
    elif isinstance(inputs, dict):
        args, kwargs = (), dict(inputs)
    else:
        args = tuple(inputs)
    return model, args, kwargs, loss_fn
