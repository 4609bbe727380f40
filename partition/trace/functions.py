"""Custom autograd Functions in a traced model: one opaque node each, on both trace routes.

[Note: custom autograd Functions]
``Fn.apply(x)`` runs ``Fn.forward`` and records ``Fn.backward`` for the gradient, which may be
anything (a gradient-reversal layer returns ``-g``). Tracing *through* the call records only the
forward's ops, so the split model would differentiate those instead and train differently. So:

* the fx route, while tracing, turns every call of a user Function (one not defined inside
  torch) on proxies into one ``call_function`` node whose target calls ``Fn.apply``: stages run
  the Function's own forward and backward; shapes, FLOPs and saved tensors come from running it
  on meta like any other node;
* ``torch.export`` (non-strict) would trace through, so while exporting every call becomes one
  call of a custom op, ``pipepart::autograd_function`` (`export_functions`): its fake kernel runs
  the Function's forward on fake tensors for the output's shapes, and the op is one node of the
  exported graph. Afterwards `keep_opaque` points that node at the Function itself, as on fx: a
  stage runs ``Fn.apply`` (its own forward and backward), costing runs it on meta. That needs
  the call's other arguments to be constants a graph can hold (numbers, strings, dtypes...): a
  call passing anything else (a module, a function) is refused, naming the Function — as is
  torch's own reentrant ``torch.utils.checkpoint``, whose argument is the function it runs.

On the fx route, Functions defined inside torch are traced through as before (symbolic tracing
does not record ``no_grad``, so a checkpointed block keeps its gradient, without recomputation).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.autograd import Function
from torch.utils._pytree import TreeSpec, tree_flatten, tree_leaves, tree_unflatten

__all__ = ["ExportedFunctions", "export_functions", "keep_opaque", "opaque_functions"]


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


# --- the export route ------------------------------------------------------------------------

_CONSTANT: tuple[type, ...] = (type(None), bool, int, float, complex, str, slice, type(...))
_CONSTANT += (torch.dtype, torch.device, torch.layout, torch.memory_format)
_CALLS: dict[int, _Call] = {}
"""The Function calls of the exports under way, by the number the op's node carries."""
_NUMBERS = itertools.count()
_INSIDE: list[int] = []
"""Non-empty while a kernel runs a Function: a Function it calls runs as it is."""


@dataclass(eq=False)
class _Call:
    """One call of a Function while exporting: its arguments with the tensors taken out."""

    cls: type[Function]
    spec: TreeSpec
    leaves: list[Any]
    """The flat ``(args, kwargs)``, None where a tensor goes."""
    tensor_at: list[int]
    out_spec: TreeSpec | None = None
    out_leaves: list[Any] = field(default_factory=list)
    """The flat output the fake kernel saw, None where a tensor goes."""

    def run(self, tensors: Sequence[torch.Tensor]) -> Any:
        """``cls.apply`` on the call's arguments, ``tensors`` put back in place."""
        leaves = list(self.leaves)
        for at, tensor in zip(self.tensor_at, tensors, strict=True):
            leaves[at] = tensor
        args, kwargs = tree_unflatten(leaves, self.spec)
        return _original_apply(self.cls)(*args, **kwargs)


def _original_apply(cls: type[Function]) -> Callable[..., Any]:
    return Function.__dict__["apply"].__get__(None, cls)


def _tensors_out(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def _kernel(tensors: list[torch.Tensor], call: int) -> list[torch.Tensor]:
    """The op's kernel (real and fake): the Function's forward, its tensors copied (an op's
    outputs may not alias its inputs); the first run records the output's structure."""
    record = _CALLS[call]
    _INSIDE.append(call)
    try:
        with torch.no_grad():
            out = record.run(tensors)
    finally:
        _INSIDE.pop()
    flat, record.out_spec = tree_flatten(out)
    record.out_leaves = [None if isinstance(v, torch.Tensor) else v for v in flat]
    return [t.clone() for t in _tensors_out(out)]


@functools.cache
def _op() -> Any:
    """``pipepart::autograd_function(Tensor[] tensors, int call) -> Tensor[]``, made once."""
    op = torch.library.custom_op(
        "pipepart::autograd_function",
        _kernel,
        mutates_args=(),
        schema="(Tensor[] tensors, int call) -> Tensor[]",
    )
    op.register_fake(_kernel)
    return op


@dataclass
class ExportedFunctions:
    """What `export_functions` saw: the calls kept as ops, and the Functions it could not keep."""

    calls: dict[int, _Call] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    """Qualified class name -> why it cannot be kept opaque."""


@contextlib.contextmanager
def export_functions() -> Iterator[ExportedFunctions]:
    """While exporting, each call of a Function (torch's private machinery aside) becomes one
    call of the ``pipepart::autograd_function`` op; see [Note: custom autograd Functions]."""
    seen = ExportedFunctions()

    def hook(cls: type[Function], run: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        flat, spec = tree_flatten((args, kwargs))
        tensor_at = [i for i, v in enumerate(flat) if isinstance(v, torch.Tensor)]
        others = {type(v).__name__ for v in flat if not isinstance(v, (torch.Tensor, *_CONSTANT))}
        if _is_internal(cls) or not tensor_at or _INSIDE:
            return run(*args, **kwargs)
        name = f"{cls.__module__}.{cls.__qualname__}"
        if others:
            seen.refused.setdefault(name, f"it is passed a {', '.join(sorted(others))}")
            return run(*args, **kwargs)
        number = next(_NUMBERS)
        leaves = [None if isinstance(v, torch.Tensor) else v for v in flat]
        record = seen.calls[number] = _CALLS[number] = _Call(cls, spec, leaves, tensor_at)
        tensors = _op()([flat[i] for i in tensor_at], number)
        if record.out_spec is None:  # the kernel did not run: an op export could not record
            raise RuntimeError(f"the op for {name} did not run its fake kernel")
        out = list(record.out_leaves)
        slots = [i for i, v in enumerate(out) if v is None]
        for at, tensor in zip(slots, tensors, strict=True):
            out[at] = tensor
        return tree_unflatten(out, record.out_spec)

    try:
        with _patched_apply(hook):
            yield seen
    finally:
        for number in seen.calls:
            _CALLS.pop(number, None)


def keep_opaque(module: fx.GraphModule, seen: ExportedFunctions) -> None:
    """Point each ``pipepart::autograd_function`` node of ``module`` (and of the graphs it
    holds) at its Function: a call of ``Fn_apply(tensors)``, which returns the output's tensors
    in the op's order, so the op's ``getitem`` users stay as they are."""
    _op()
    op = torch.ops.pipepart.autograd_function.default
    for gm in [m for m in module.modules() if isinstance(m, fx.GraphModule)]:
        changed = False
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is op:
                record = seen.calls[int(node.args[1])]
                node.target = _flat_apply(record)
                node.args = (node.args[0],)
                node._rename(record.cls.__name__.lower())
                changed = True
        if changed:
            gm.recompile()


def _flat_apply(record: _Call) -> Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]:
    """The node target of one call: ``Fn.apply`` on the call's arguments, its tensors out."""

    def apply(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return _tensors_out(record.run(tensors))

    cls = record.cls
    apply.__name__ = apply.__qualname__ = f"{cls.__name__}_apply"
    apply.__module__ = cls.__module__
    return apply
