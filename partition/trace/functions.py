"""Custom autograd Functions in a traced model: one opaque node each (fx), or a clear refusal.

[Note: custom autograd Functions]
``Fn.apply(x)`` runs ``Fn.forward`` and records ``Fn.backward`` for the gradient, which may be
anything (a gradient-reversal layer returns ``-g``). Tracing *through* the call records only the
forward's ops, so the split model would differentiate those instead and train differently. So:

* the fx route, while tracing, turns every call of a user Function (one not defined inside
  torch) on proxies into one ``call_function`` node whose target calls ``Fn.apply``: stages run
  the Function's own forward and backward; shapes, FLOPs and saved tensors come from running it
  on meta like any other node;
* ``torch.export`` (non-strict) can only trace through, so the export route watches the calls
  and refuses a model that makes any, naming the Functions and pointing at ``method="fx"``. That
  includes torch's own public ones: a reentrant ``torch.utils.checkpoint`` runs its forward under
  ``no_grad``, which export records, so its gradient would be lost too.

On the fx route, Functions defined inside torch are traced through as before (symbolic tracing
does not record ``no_grad``, so a checkpointed block keeps its gradient, without recomputation).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch.fx as fx
from torch.autograd import Function
from torch.utils._pytree import tree_leaves

__all__ = ["opaque_functions", "watch_functions"]


def _is_user_function(cls: type) -> bool:
    return not str(getattr(cls, "__module__", "")).startswith("torch.")


def _is_internal(cls: type) -> bool:
    """A Function of torch's private machinery (what export itself may call)."""
    return str(getattr(cls, "__module__", "")).startswith("torch._")


@functools.cache
def _apply_of(cls: type[Function]) -> Callable[..., Any]:
    """The node target for ``cls.apply``: a named function, so the stage code reads well."""

    def apply(*args: Any, **kwargs: Any) -> Any:
        return cls.apply(*args, **kwargs)

    apply.__name__ = apply.__qualname__ = f"{cls.__name__}_apply"
    apply.__module__ = cls.__module__
    return apply


@contextlib.contextmanager
def _patched_apply(
    hook: Callable[[type[Function], Callable[..., Any], Any, Any], Any],
) -> Iterator[None]:
    original = Function.__dict__["apply"]

    def apply(cls: type[Function], *args: Any, **kwargs: Any) -> Any:
        return hook(cls, original.__get__(None, cls), args, kwargs)

    Function.apply = classmethod(apply)  # type: ignore[assignment, method-assign]
    try:
        yield
    finally:
        Function.apply = original  # type: ignore[method-assign]


@contextlib.contextmanager
def opaque_functions() -> Iterator[None]:
    """While symbolic tracing, a user Function applied to proxies becomes one node; see
    [Note: custom autograd Functions]."""

    def hook(cls: type[Function], run: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        proxy = next((a for a in tree_leaves((args, kwargs)) if isinstance(a, fx.Proxy)), None)
        if proxy is None or not _is_user_function(cls):
            return run(*args, **kwargs)
        return proxy.tracer.create_proxy("call_function", _apply_of(cls), args, kwargs)

    with _patched_apply(hook):
        yield


@contextlib.contextmanager
def watch_functions() -> Iterator[list[str]]:
    """Yields the Functions called inside the block (qualified class names), torch's private
    machinery aside."""
    seen: list[str] = []

    def hook(cls: type[Function], run: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        name = f"{cls.__module__}.{cls.__qualname__}"
        if not _is_internal(cls) and name not in seen:
            seen.append(name)
        return run(*args, **kwargs)

    with _patched_apply(hook):
        yield seen
