"""Running an FX graph's nodes on the ``meta`` device: shapes, FLOPs and saved tensors, no weights.

Parameters and buffers are swapped for ``meta`` copies (``torch.empty_like(..., device="meta")``),
so a model on CPU and a 10 B-parameter model built under ``torch.device("meta")`` are handled alike
and nothing the size of a weight or an activation is ever allocated.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_map

from partition.errors import TraceError
from partition.trace.tensor_constants import CONSTANTS

__all__ = ["MetaState", "fetch_args", "run_node", "to_meta"]


def to_meta(value: Any) -> Any:
    """``value`` with every tensor replaced by a ``meta`` tensor of the same shape and dtype."""

    def convert(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            if x.device.type == "meta":
                return x
            out = torch.empty_like(x, device="meta")
            return out.requires_grad_(x.requires_grad) if out.is_floating_point() else out
        return x

    return tree_map(convert, value)


class MetaState:
    """Meta copies of a module's parameters, buffers and tensor constants (by their
    ``_pipepart_constants.<key>`` targets), made once and shared by every node."""

    def __init__(
        self, root: nn.Module, constants: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        self.root = root
        self._tensors: dict[str, torch.Tensor] = {}
        self._by_id: dict[int, torch.Tensor] = {}
        named = [
            *_named_tensors(root),
            *((f"{CONSTANTS}.{k}", v) for k, v in (constants or {}).items()),
        ]
        for name, tensor in named:
            meta = self._by_id.get(id(tensor))
            if meta is None:
                meta = to_meta(tensor.detach())
                if isinstance(tensor, nn.Parameter):
                    meta = nn.Parameter(meta, requires_grad=tensor.requires_grad)
                self._by_id[id(tensor)] = meta
            self._tensors[name] = meta
        self._module_states: dict[str, dict[str, torch.Tensor]] = {}

    def tensor(self, qualified_name: str) -> torch.Tensor:
        return self._tensors[qualified_name]

    def has(self, qualified_name: str) -> bool:
        return qualified_name in self._tensors

    def module_state(self, path: str) -> dict[str, torch.Tensor]:
        """The meta parameters and buffers of the submodule at ``path``, by local name."""
        state = self._module_states.get(path)
        if state is None:
            prefix = f"{path}." if path else ""
            state = {k[len(prefix) :]: v for k, v in self._tensors.items() if k.startswith(prefix)}
            self._module_states[path] = state
        return state

    def fetch_attr(self, target: str) -> Any:
        if target in self._tensors:
            return self._tensors[target]
        obj: Any = self.root
        for atom in target.split("."):
            obj = getattr(obj, atom)
        return to_meta(obj)


def _named_tensors(root: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from root.named_parameters(remove_duplicate=False)
    yield from root.named_buffers(remove_duplicate=False)


def fetch_args(node: fx.Node, values: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The node's positional and keyword arguments with every input node replaced by its value."""
    args = fx.node.map_arg(node.args, lambda n: values[n.name])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: values[n.name])
    return tuple(args), dict(kwargs)


def run_node(node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any], state: MetaState) -> Any:
    """Execute one non-placeholder node on meta values."""
    if node.op == "get_attr":
        return state.fetch_attr(str(node.target))
    if node.op == "call_function":
        # ATen graphs pin factory ops to the traced device (arange(device=cpu)): stay on meta
        args, kwargs = _on_meta((args, kwargs))
        return node.target(*args, **kwargs)  # type: ignore[operator]
    if node.op == "call_method":
        self_obj, *rest = args
        return getattr(self_obj, str(node.target))(*rest, **kwargs)
    if node.op == "call_module":
        path = str(node.target)
        module = state.root.get_submodule(path)
        try:
            return torch.func.functional_call(module, state.module_state(path), args, kwargs)
        except (RuntimeError, NotImplementedError) as e:
            if "meta" not in str(e):
                raise
            return _run_module_for_real(module, args, kwargs)
    raise TraceError(
        f"cannot run node {node.name} of op {node.op!r} on meta: only get_attr, call_function, "
        "call_method and call_module nodes run (placeholders and the output are not computed)"
    )


def _on_meta(value: Any) -> Any:
    return tree_map(lambda x: _META if isinstance(x, torch.device) else x, value)


_META = torch.device("meta")


def _run_module_for_real(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Fallback for a leaf module that cannot run on meta (data-dependent code such as ``.item()``).

    Runs a CPU copy of just this module on zero-filled inputs of the right shapes; the branch taken
    is the one zeros take. Only this module's weights are allocated, for the duration of the call.
    """
    import copy

    real = copy.deepcopy(module)
    if any(t.device.type == "meta" for t in real.state_dict().values()):
        real = real.to_empty(device="cpu")
    else:
        real = real.cpu()

    def zeros(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            out = torch.zeros(x.shape, dtype=x.dtype, device="cpu")
            return out.requires_grad_(x.requires_grad) if out.is_floating_point() else out
        return x

    with torch.enable_grad():
        result = real(*tree_map(zeros, args), **tree_map(zeros, kwargs))
    return to_meta(result)
