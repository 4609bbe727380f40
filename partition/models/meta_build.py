"""A model factory that cannot build its model on ``meta``: said plainly, and built on the CPU.

[Note: building on meta]
pipepart calls a model factory under ``torch.device("meta")`` — in the planner, in the launcher
and on every rank — so that tracing and planning allocate no weight. A model that computes with
tensor *values* while it is built (torchvision's RegNet derives its widths with tensor ops in
``__init__``; a ``.item()`` or ``.tolist()``) cannot: a meta tensor has a shape and no data
(``NotImplementedError: Cannot copy out of meta tensor``). Then, unless the caller forbids it
(``cpu_fallback=False``), the factory is called again under ``torch.device("cpu")`` — the whole
model in host memory, once — and its parameters, buffers and example tensors are moved to meta
(tied weights stay tied), so whoever asked gets what a meta build gives; a warning says so. The
CPU's random state is kept as it was, so the retry changes no later random number. When that
fails too, or is forbidden, the `FactoryError` says that pipepart built the model on meta, why
this one failed there, and the ways out.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import os
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from partition.errors import factory_error

__all__ = ["cpu_fallback", "meta_failure", "on_meta_or_cpu"]

log = logging.getLogger(__name__)

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_FALLBACK = contextvars.ContextVar("pipepart_cpu_fallback", default=True)


@contextlib.contextmanager
def cpu_fallback(allowed: bool) -> Iterator[None]:
    """Within the block, a factory that cannot build on meta is (or is not) built on the CPU."""
    token = _FALLBACK.set(allowed)
    try:
        yield
    finally:
        _FALLBACK.reset(token)


def meta_failure(error: Exception) -> bool:
    """Whether ``error`` is a factory failing because it was called under meta."""
    said = f"{type(error).__name__}: {error}".lower()
    return torch.get_default_device().type == "meta" and "meta" in said


def on_meta_or_cpu(
    model_fn: Callable[..., Any], name: str, error: Exception, kwargs: dict[str, Any]
) -> Any:
    """What ``model_fn(**kwargs)`` builds on the CPU, moved to meta (``error`` is what it raised
    on meta); see [Note: building on meta].

    Raises:
        FactoryError: the fallback is forbidden, or the CPU build fails too.
    """
    why = _why(name, error)
    if not _FALLBACK.get():
        raise factory_error(error, f"{why}. Ways out: {_WAYS_OUT}") from error
    log.warning(
        "%s; building it on the CPU instead, which holds the whole model in host memory once, "
        "then moving it to meta. To skip the failed try, build on the CPU inside the factory "
        "(`with torch.device('cpu'): model = ...`)",
        why,
    )
    with torch.device("cpu"), torch.random.fork_rng(devices=[]):
        try:
            built = model_fn(**kwargs)
        except Exception as cpu_error:
            raise factory_error(
                error,
                f"{why}. Built on the CPU instead, it raised {type(cpu_error).__name__}: "
                f"{cpu_error}. Ways out: {_WAYS_OUT}",
            ) from error
    return _to_meta(built)


_WAYS_OUT = (
    "build the model on the CPU inside the factory (`with torch.device('cpu'): model = ...`) "
    "when it fits in host memory — pipepart then plans and runs that model as it is; or compute "
    "those values with Python numbers rather than tensors while the model is built"
)


def _why(name: str, error: Exception) -> str:
    """That pipepart built the model on meta, and where and why this factory failed there."""
    where = ""
    for frame, lineno in traceback.walk_tb(error.__traceback__):
        filename = frame.f_code.co_filename
        if not filename.startswith(_TORCH_DIR):
            where = f" at {filename}:{lineno}"
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return (
        f"the model factory {name} cannot build its model under torch.device('meta'), where "
        "pipepart builds it to trace and plan it without allocating a weight: it raised "
        f"{type(error).__name__}: {first}{where} — the model computes with tensor values while "
        "it is built, and a meta tensor has a shape but no values"
    )


def _to_meta(built: Any) -> Any:
    """``built`` (a module, a factory's tuple or a `BuiltModel`) with every tensor on meta."""
    if isinstance(built, nn.Module):
        return _module_to_meta(built)
    model = getattr(built, "model", None)
    if isinstance(model, nn.Module) and dataclasses.is_dataclass(built):  # a BuiltModel
        _module_to_meta(model)
        fields = {f: _tensors_to_meta(getattr(built, f)) for f in ("args", "kwargs", "target")}
        return dataclasses.replace(built, **fields)  # type: ignore[type-var]
    if isinstance(built, tuple) and built and isinstance(built[0], nn.Module):
        _module_to_meta(built[0])
        rest = [value if callable(value) else _tensors_to_meta(value) for value in built[1:]]
        return (built[0], *rest)
    return built


def _tensors_to_meta(value: Any) -> Any:
    return tree_map(
        lambda t: torch.empty_like(t, device="meta") if isinstance(t, torch.Tensor) else t, value
    )


def _module_to_meta(model: nn.Module) -> nn.Module:
    """Every parameter and buffer moved to meta in place; a tensor held twice stays one."""
    moved: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for key, tensor in table.items():
                if tensor is None:
                    continue
                if id(tensor) not in moved:
                    meta = torch.empty_like(tensor, device="meta")
                    if isinstance(tensor, nn.Parameter):
                        meta = nn.Parameter(meta, requires_grad=tensor.requires_grad)
                    moved[id(tensor)] = meta
                table[key] = moved[id(tensor)]  # type: ignore[assignment]
    return model
