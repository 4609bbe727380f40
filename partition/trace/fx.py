"""Tracing a model into an FX graph on the ``meta`` device, with shapes on every node.

Two routes give a `torch.fx.GraphModule`:

* ``"fx"``: `torch.fx` symbolic tracing — one node per leaf module or tensor operation, named by
  the user's module paths. Options: ``leaf_modules`` (keep a submodule as one node),
  ``concrete_args`` (fix an input to a constant, e.g. a flag that drives control flow) and
  ``tracer_class`` (a `torch.fx.Tracer` subclass of your own).
* ``"export"``: `torch.export.export(strict=False)` — an ATen-level graph, the route for models
  symbolic tracing cannot handle (transformers 5). Parameters become placeholders; nodes keep the
  user's module path in ``nn_module_stack``.

``"auto"`` tries ``"fx"`` and falls back to ``"export"``. Either way every node gets
``node.meta["val"]`` (meta tensors, or plain Python values) and ``node.meta["tensor_meta"]`` from
running the graph on meta tensors (see `partition.trace.meta`); no weight is ever read. Running it also
records which nodes write in place (see [Note: in-place ops] in `partition.trace.inplace`).

On both routes: tensor constants are lifted into `TracedModel.constants` ([Note: tensor
constants] in `partition.trace.tensor_constants`), ``pipe_split()`` markers are taken out and remembered
([Note: pipe_split markers] in `partition.trace.markers`), and custom autograd Functions keep their
backward ([Note: custom autograd Functions] in `partition.trace.functions`).
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import linecache
import os
import re
import traceback
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten

from partition.errors import InputError, TraceError
from partition.trace.assigns import AttributeWatch, assigns_error, is_proxy
from partition.trace.export import trace_export
from partition.trace.functions import opaque_functions
from partition.trace.markers import record_markers, take_markers
from partition.trace.tensor_constants import (
    check_default_containers,
    graph_module,
    lift_fx_constants,
)
from partition.trace.traced import TracedModel, module_path, propagate_shapes, route_error

__all__ = ["TraceMethod", "TracedModel", "module_path", "propagate_shapes", "trace"]

TraceMethod = Literal["auto", "fx", "export"]
LeafSpec = str | type[nn.Module]
_TORCH_DIR = os.path.dirname(torch.__file__)
_CLASS = "class:"
_OUR_DIR = os.path.dirname(os.path.dirname(__file__))  # the partition package: our frames


def trace(
    model: nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor = (),
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    method: TraceMethod = "auto",
    leaf_modules: Sequence[LeafSpec] = (),
    concrete_args: Mapping[str, Any] | None = None,
    tracer_class: type[fx.Tracer] | None = None,
) -> TracedModel:
    """Trace ``model`` called as ``model(*example_inputs, **example_kwargs)``.

    Args:
        model: any `nn.Module`, on any device including ``meta``.
        example_inputs: positional inputs of one micro-batch (tensors on any device; only their
            shapes and dtypes are used).
        example_kwargs: keyword inputs (``input_ids=...``).
        method: ``"fx"``, ``"export"`` or ``"auto"`` (fx, falling back to export).
        leaf_modules: submodules to keep as single nodes, by qualified name (glob patterns such as
            ``"h.*.attn"`` allowed) or by class. fx only.
        concrete_args: forward arguments fixed to constants during tracing. fx only.
        tracer_class: a `torch.fx.Tracer` subclass to trace with. fx only.

    Raises:
        InputError: the inputs do not bind to ``model.forward``'s signature.
        TraceError: the model cannot be traced; the message names the module and the source line
            and says which option gets past it.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    args, kwargs = tuple(example_inputs), dict(example_kwargs or {})
    bound = _bind(model, args, kwargs, concrete_args)
    if method not in ("auto", "fx", "export"):
        raise InputError(f"unknown trace method {method!r}; choose 'auto', 'fx' or 'export'")
    fx_options = bool(leaf_modules) or concrete_args is not None or tracer_class is not None
    if method == "export" and fx_options:
        raise InputError("leaf_modules, concrete_args and tracer_class apply to method='fx' only")
    if method == "export":
        return _trace_export(model, args, kwargs)
    try:
        traced = _trace_fx(model, bound, leaf_modules, concrete_args, tracer_class)
        traced.leaf_modules = leaf_names(leaf_modules)
    except TraceError as fx_error:
        if method == "fx" or fx_options:
            raise
        try:
            return _trace_export(model, args, kwargs)
        except TraceError as export_error:
            raise _neither(type(model).__name__, fx_error, export_error) from fx_error
    return traced


# --- inputs ---------------------------------------------------------------------------------


def leaf_names(specs: Sequence[LeafSpec]) -> tuple[str, ...]:
    """``leaf_modules`` as text a plan can hold: names and patterns as they are, a class as
    ``class:module.QualName`` (see `leaf_specs`)."""
    return tuple(
        s if isinstance(s, str) else f"{_CLASS}{s.__module__}.{s.__qualname__}" for s in specs
    )


def leaf_specs(names: Sequence[str]) -> list[LeafSpec]:
    """`leaf_names` read back: a ``class:`` entry imported, the rest names and patterns."""
    specs: list[LeafSpec] = []
    for name in names:
        if not name.startswith(_CLASS):
            specs.append(name)
            continue
        module, _, qualname = name[len(_CLASS) :].rpartition(".")
        try:
            value: Any = importlib.import_module(module)
            for part in qualname.split("."):
                value = getattr(value, part)
        except (ImportError, AttributeError) as e:
            raise InputError(
                f"the plan keeps {name[len(_CLASS) :]} modules whole, which cannot be imported "
                f"here ({e}); install what defines it, or re-plan"
            ) from e
        specs.append(value)
    return specs


def _bind(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    concrete_args: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Bind the example inputs to ``model.forward``; a clear error names the signature."""
    signature = inspect.signature(model.forward)
    merged = dict(kwargs)
    for key in concrete_args or {}:
        merged.setdefault(key, concrete_args[key])  # type: ignore[index]
    try:
        bound = signature.bind(*args, **merged)
    except TypeError as e:
        raise InputError(
            f"example inputs do not match {type(model).__name__}.forward{signature}: {e}. "
            f"Got {len(args)} positional input(s) {_describe(args)} and keywords {sorted(kwargs)}"
        ) from None
    return dict(bound.arguments)


def _describe(values: Sequence[Any]) -> str:
    parts = []
    for v in values:
        if isinstance(v, torch.Tensor):
            parts.append(f"Tensor{tuple(v.shape)}:{str(v.dtype).removeprefix('torch.')}")
        else:
            parts.append(type(v).__name__)
    return "(" + ", ".join(parts) + ")"


# --- fx route -------------------------------------------------------------------------------


def _make_tracer(
    model: nn.Module, leaf_modules: Sequence[LeafSpec], tracer_class: type[fx.Tracer] | None
) -> fx.Tracer:
    base = tracer_class or fx.Tracer
    names = [s for s in leaf_modules if isinstance(s, str)]
    types = tuple(s for s in leaf_modules if isinstance(s, type))
    known = {name for name, _ in model.named_modules()}
    for pattern in names:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in known):
            raise InputError(
                f"leaf module {pattern!r} matches no submodule of {type(model).__name__}; "
                f"module paths look like {', '.join(sorted(known - {''})[:4])}"
            )

    class _LeafTracer(base):  # type: ignore[valid-type, misc]
        # A buffer read in traced code becomes a get_attr node, not a concrete tensor: otherwise
        # `self.inv_freq.cos()` is computed once while tracing and frozen into the graph as a
        # constant — on a rank, from a buffer that is still on meta.
        proxy_buffer_attributes = True

        def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
            if types and isinstance(m, types):
                return True
            if any(fnmatch.fnmatchcase(module_qualified_name, p) for p in names):
                return True
            return bool(super().is_leaf_module(m, module_qualified_name))

    return _LeafTracer()


def _trace_fx(
    model: nn.Module,
    bound: dict[str, Any],
    leaf_modules: Sequence[LeafSpec],
    concrete_args: Mapping[str, Any] | None,
    tracer_class: type[fx.Tracer] | None,
) -> TracedModel:
    tracer = _make_tracer(model, leaf_modules, tracer_class)
    concrete = _constants(model, bound)
    concrete.update(concrete_args or {})
    check_default_containers(model, {**bound, **concrete})
    before = set(vars(model))
    watch = AttributeWatch(model)
    try:
        with opaque_functions(), record_markers(tracer):
            graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as e:
        watch.restore(is_proxy)
        for name in _stowed(model, before):
            delattr(model, name)
        raise _explain(model, e) from e
    assigned = watch.restore(is_proxy)
    if assigned:
        for name in _stowed(model, before):
            delattr(model, name)
        raise assigns_error(type(model).__name__, assigned)
    added = _stowed(model, before)  # lift_fx_constants takes them back off the model
    markers = take_markers(graph)
    constants, sources = lift_fx_constants(model, graph, bound, added)
    module = graph_module(tracer.root, graph, constants, type(model).__name__, sources)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    inputs: dict[str, Any] = {}
    for node in placeholders:
        name = str(node.target).lstrip("*")
        base = re.sub(r"_\d+$", "", name)
        if name in concrete or (name not in bound and base in concrete):
            inputs[node.name] = concrete[name if name in concrete else base]
        elif name in bound:
            inputs[node.name] = bound[name]
        elif node.args:
            inputs[node.name] = node.args[0]  # the default value
        else:
            inputs[node.name] = None
    traced = TracedModel(
        module=module,
        model=model,
        method="fx",
        input_names=tuple(
            str(n.target)
            for n in placeholders
            if str(n.target) in bound and str(n.target) not in concrete
        ),
        constants=constants,
        constant_sources=sources,
        markers=markers,
    )
    propagate_shapes(traced, inputs)
    return traced


def _stowed(model: nn.Module, before: set[str]) -> set[str]:
    """Attributes fx set on ``model`` while tracing: the tensors made in forward it stows there."""
    return {n for n in set(vars(model)) - before if n.startswith("_tensor_constant")}


def _constants(model: nn.Module, bound: dict[str, Any]) -> dict[str, Any]:
    """Forward arguments that are not tensors become constants of the graph.

    That covers defaults the caller did not pass (``attention_mask=None``, ``use_cache=False``)
    and Python values the caller did pass (``scale=2.0``): only tensors are graph inputs. A
    tensor default stays an input of the trace and becomes a constant of the graph afterwards
    (`partition.trace.tensor_constants.lift_fx_constants`).
    """
    signature = inspect.signature(model.forward)
    constants = {}
    for name, parameter in signature.parameters.items():
        if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if name in bound:
            leaves, _ = tree_flatten(bound[name])
            if not any(isinstance(v, torch.Tensor) for v in leaves):
                constants[name] = bound[name]
        elif parameter.default is not inspect.Parameter.empty:
            leaves, _ = tree_flatten(parameter.default)
            if not any(isinstance(v, torch.Tensor) for v in leaves):
                constants[name] = parameter.default
    return constants


def _explain(model: nn.Module, error: Exception) -> TraceError:
    """A `TraceError` naming the deepest module of ``model`` on the stack and its source line."""
    paths = {id(m): name for name, m in model.named_modules()}
    where, path = "", ""
    tb: TracebackType | None = error.__traceback__
    for frame, lineno in traceback.walk_tb(tb):
        filename = frame.f_code.co_filename
        if filename.startswith((_TORCH_DIR, _OUR_DIR)) or not frame.f_code.co_argcount:
            continue
        owner = frame.f_locals.get(frame.f_code.co_varnames[0])
        if isinstance(owner, nn.Module) and id(owner) in paths:
            path = paths[id(owner)]
            line = linecache.getline(frame.f_code.co_filename, lineno).strip()
            where = f" in module {path or '<root>'!r} ({type(owner).__name__}) at {frame.f_code.co_filename}:{lineno}: `{line}`"
    kind = type(error).__name__
    message = str(error).strip().splitlines()[0] if str(error).strip() else kind
    ways = []
    if where:
        ways.append(
            f"keep {path!r} as one node (leaf_modules=[{path!r}] / --leaf {path})"
            if path
            else "keep the module that fails as one node (leaf_modules=[...] / --leaf PATH)"
        )
    if "control flow" in message or "iterated" in message or "bool" in message.lower():
        message += " (Python control flow or iteration depends on a tensor's value)"
        ways.append("fix the input that drives the branch (concrete_args={...})")
    return route_error(
        f"cannot trace {type(model).__name__}{where}: {kind}: {message.rstrip('.')}",
        ", ".join(ways),
        "or trace through torch.export (method='export' / --trace export)",
    )


def _neither(name: str, fx_error: TraceError, export_error: TraceError) -> TraceError:
    """Both routes failed: what each hit, and each one's own ways out (never the other route,
    which failed too)."""
    ways = "; ".join(w for w in (fx_error.ways_out, export_error.ways_out) if w)
    return TraceError(
        f"cannot trace {name} by either route.\n"
        f"fx (symbolic tracing): {fx_error.hit or fx_error}.\n"
        f"torch.export: {export_error.hit or export_error}.\n"
        + (
            f"Ways out: {ways}; or change the code that each names."
            if ways
            else "Neither route offers a way out of its own: change the code that each names "
            "(or build the model with options that avoid it)."
        )
    )


# --- export route ---------------------------------------------------------------------------


def _trace_export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> TracedModel:
    return trace_export(model, args, kwargs)
