"""The ``torch.export`` trace route: an ATen-level FX graph for models symbolic tracing cannot handle.

``torch.export.export(model, args, kwargs, strict=False)`` lifts parameters, buffers and constant
tensors to placeholders. pipepart turns them back into attributes of a root module that mirrors
the model — the same submodule objects under the same names, so parameters keep their qualified
names and are shared, never copied — and the lifted constants into `TracedModel.constants`
(see [Note: tensor constants] in `partition.trace.tensor_constants`). A custom autograd Function
stays one node running its own forward and backward ([Note: custom autograd Functions] in
`partition.trace.functions`). A tensor assigned to a module attribute in forward is dropped
from the graph: the attribute is restored and a warning names it. User
inputs stay placeholders, outputs are the flat list of the model's output tensors and
``TracedModel.out_spec`` rebuilds the model's own structure (a ``ModelOutput``, a dict, a tuple).
Nodes keep the user's module path in ``nn_module_stack``, so plans still name ``h.3.attn``.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import re
import warnings
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.export.graph_signature import InputKind
from torch.utils._pytree import tree_map

from partition.errors import TraceError
from partition.trace.assigns import AttributeWatch
from partition.trace.functions import export_functions, keep_opaque
from partition.trace.markers import take_markers
from partition.trace.tensor_constants import CONSTANTS, graph_module
from partition.trace.traced import TracedModel, propagate_shapes, route_error

__all__ = ["trace_export"]


class ExportRoot(nn.Module):
    """The model's children and direct tensors under their own names."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model_class = type(model).__name__
        """The traced model's class name (plans and messages name the user's class)."""
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buffer in model.named_buffers(recurse=False):
            self.register_buffer(
                name, buffer, persistent=name not in model._non_persistent_buffers_set
            )


def _export_as_cpu(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``torch.export.export(strict=False)``, with a model on ``meta`` seen as on the CPU.

    [Note: tracing as on the CPU]
    Code that branches on a tensor's device (transformers' MoE routing picks ``histc``'s dtype
    by ``device.type``: floats on the CPU, int32 elsewhere) bakes the branch it took into the
    graph. On ``meta`` it takes a branch no real device would, and the stage fails where it
    runs. So meta parameters, buffers and inputs are traced as fake tensors on the CPU
    (`FakeTensor` over the same meta storage: still nothing allocated) — the branch the CPU
    takes, which CUDA accepts too; device literals are then made to follow the inputs
    (`_follow_input_device`). If export refuses that, the model is traced on meta as it is.
    """
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    tensors = [*model.parameters(), *model.buffers()]
    if not tensors or any(t.device.type != "meta" for t in tensors):
        return torch.export.export(model, args, kwargs, strict=False)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    cpu = torch.device("cpu")

    def fake(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.device.type == "meta":
            return FakeTensor(mode, value, cpu)
        return value

    saved: list[tuple[dict[str, Any], str, Any]] = []
    program = None
    try:
        for module in model.modules():
            for table in (module._parameters, module._buffers):
                for name, value in list(table.items()):
                    if value is None:
                        continue
                    saved.append((table, name, value))
                    if isinstance(value, nn.Parameter):
                        table[name] = nn.Parameter(fake(value.data), value.requires_grad)
                    else:
                        table[name] = fake(value)
        with mode:
            program = torch.export.export(
                model, tuple(tree_map(fake, args)), tree_map(fake, kwargs), strict=False
            )
    except Exception:
        program = None
    finally:
        for table, name, value in reversed(saved):
            table[name] = value
    if program is None:
        return torch.export.export(model, args, kwargs, strict=False)
    for key, value in list(program.constants.items()):  # unknown values, as on meta
        if isinstance(value, FakeTensor):
            program.constants[key] = torch.empty_like(value, device="meta")
    return program


def trace_export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> TracedModel:
    """Trace ``model`` with ``torch.export.export(strict=False)``; see the module docstring."""
    defaults = _tensor_defaults(model, args, kwargs)
    given = {**kwargs, **{name: _beside(model, value) for name, value in defaults.items()}}
    name = type(model).__name__
    watch = AttributeWatch(model)
    try:
        with export_functions() as functions:
            program = _export_as_cpu(model, args, given)
    except Exception as e:
        raise _explain(name, e) from e
    finally:
        assigned = watch.restore(_is_fake)
    if assigned:  # see [Note: attributes assigned in forward]
        warnings.warn(
            f"{name}'s forward assigns {'; '.join(str(a) for a in assigned)}: the split model "
            "computes the same outputs but does not keep that assignment (update a buffer made "
            "with register_buffer in place, `self.x.copy_(value)`, to keep it)",
            UserWarning,
            stacklevel=3,
        )
    if functions.refused:
        said = "; ".join(f"{fn} ({why})" for fn, why in functions.refused.items())
        raise route_error(
            f"{name} calls the custom autograd Function(s) {said}: torch.export would trace "
            "through its forward and lose its backward, and a Function kept as one node may be "
            "passed only tensors and constants (numbers, strings, dtypes, devices)",
            "pass the Function only tensors and constants (a module's weights, not the module)",
            "or trace with method='fx' (--trace fx), which keeps each call as one node",
        )
    keep_opaque(program.graph_module, functions)
    module: fx.GraphModule = program.graph_module
    graph = module.graph
    constants: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    param_placeholders: dict[str, str] = {}
    user_inputs: list[str] = []
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for spec, node in zip(program.graph_signature.input_specs, placeholders, strict=True):
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            param_placeholders[node.name] = str(spec.target)
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            key = re.sub(r"\W", "_", str(spec.target))
            value = program.constants[str(spec.target)]
            if not isinstance(value, torch.Tensor):
                raise TraceError(
                    f"export lifted a non-tensor constant {spec.target!r}; not supported"
                )
            constants[key] = value
            sources[key] = f"tensor constant {spec.target!r}"
            param_placeholders[node.name] = f"{CONSTANTS}.{key}"
        elif spec.kind == InputKind.USER_INPUT and node.name in defaults:
            key = f"default_{node.name}"  # passed for the trace only: a constant of the graph
            constants[key] = defaults[node.name]
            sources[key] = f"default of argument {node.name!r}"
            param_placeholders[node.name] = f"{CONSTANTS}.{key}"
        elif spec.kind == InputKind.USER_INPUT:
            user_inputs.append(node.name)
        else:
            raise TraceError(f"export input {spec.arg} of kind {spec.kind.name} is not supported")
    _follow_input_device(module, set(user_inputs))
    markers = take_markers(graph)
    root = ExportRoot(model)
    for node in graph.nodes:  # higher-order ops (autocast regions) keep their bodies as submodules
        if node.op == "get_attr" and not _has_attr(root, str(node.target)):
            body = module.get_submodule(str(node.target))
            root.add_module(str(node.target), body)
    out_spec = program.call_spec.out_spec
    traced = TracedModel(
        module=graph_module(root, graph, constants, type(model).__name__, sources),
        model=root,
        method="export",
        input_names=tuple(user_inputs),
        param_placeholders=param_placeholders,
        out_spec=out_spec,
        constants=constants,
        constant_sources=sources,
        markers=markers,
    )
    flat, _ = torch.utils._pytree.tree_flatten((args, kwargs))
    tensors = [x for x in flat if isinstance(x, torch.Tensor)]
    if len(tensors) != len(user_inputs):
        raise TraceError(
            f"export kept {len(user_inputs)} user inputs but {len(tensors)} tensors were given; "
            "pass non-tensor options as constants of the model instead"
        )
    propagate_shapes(traced, dict(zip(user_inputs, tensors, strict=True)))
    return traced


_EXPORT_HINTS = (  # (words of export's message, the ways out export itself offers)
    (
        "which is not a known type",
        "return tensors, or tuples, lists, dicts or a ModelOutput of them (transformers: "
        "use_cache=False, so no cache object is returned)",
    ),
    (
        "data dependent",
        "data-dependent control flow needs torch.cond, or a value fixed in the model's factory",
    ),
)


def _explain(name: str, error: Exception) -> Exception:
    """What export hit (its message's first line) and the ways out that fit it."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    said = text.lower().replace("-", " ")
    ways = next((w for words, w in _EXPORT_HINTS if words in said), "")
    return route_error(
        f"torch.export could not trace {name}: {type(error).__name__}: {first.rstrip('.')}",
        ways,
        "or trace with method='fx' (--trace fx), with leaf_modules for the module that fails",
    )


def _is_fake(value: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(value, FakeTensor)


def _tensor_defaults(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """The tensor default arguments the call leaves out (``forward(self, x, y=torch.zeros(...))``).

    They are passed explicitly for the trace — on ``meta`` when the model is, where export could
    not mix them with its weights — and become constants of the graph again afterwards.
    """
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind_partial(*args, **kwargs).arguments
    except TypeError:
        return {}
    return {
        name: p.default
        for name, p in signature.parameters.items()
        if name not in bound and isinstance(p.default, torch.Tensor)
    }


def _beside(model: nn.Module, value: torch.Tensor) -> torch.Tensor:
    tensors = itertools.chain(model.parameters(), model.buffers())
    on_meta = any(t.device.type == "meta" for t in tensors)
    return torch.empty_like(value, device="meta") if on_meta else value


def _follow_input_device(module: fx.GraphModule, user_inputs: set[str]) -> None:
    """Replace ``device=cpu`` literals export pinned into the graph by the inputs' device.

    ``torch.export`` records factory ops with the device of the traced inputs. A stage runs on
    whatever device its rank has, so each literal becomes ``x.device`` for a tensor input ``x``
    of that graph (higher-order-op bodies included).
    """
    for gm in [
        module,
        *(m for m in module.modules() if isinstance(m, fx.GraphModule) and m is not module),
    ]:
        graph = gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        candidates = (
            [n for n in placeholders if n.name in user_inputs] if gm is module else placeholders
        )
        source = next((n for n in candidates if isinstance(n.meta.get("val"), torch.Tensor)), None)
        if source is None:
            continue
        device_node: fx.Node | None = None
        for node in list(graph.nodes):
            if node.op not in ("call_function", "call_method"):
                continue
            if not any(
                isinstance(v, torch.device)
                for v in torch.utils._pytree.tree_leaves((node.args, node.kwargs))
            ):
                continue
            if device_node is None:
                with graph.inserting_after(placeholders[-1]):
                    device_node = graph.call_function(getattr, (source, "device"))
            node.args, node.kwargs = torch.utils._pytree.tree_map(
                functools.partial(_replace_device, device_node), (node.args, node.kwargs)
            )
        gm.recompile()


def _replace_device(device_node: fx.Node, value: Any) -> Any:
    return device_node if isinstance(value, torch.device) else value


def _has_attr(root: nn.Module, target: str) -> bool:
    obj: Any = root
    for atom in target.split("."):
        if not hasattr(obj, atom):
            return False
        obj = getattr(obj, atom)
    return True
