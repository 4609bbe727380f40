"""Tensor constants of a traced graph: captured when tracing, carried by the modules that use them.

[Note: tensor constants]
Some tensors a forward reads are neither parameters nor buffers: a tensor default argument
(``def forward(self, x, y=torch.zeros(B, D))``), a plain tensor attribute (``self.mask = ...``
without ``register_buffer``), a tensor made in ``forward`` from Python values
(``torch.tensor([1.0, 2.0])``; fx calls it ``_tensor_constant0``, export ``lifted_tensor_0``).
Both trace routes turn each into a ``get_attr`` of ``_pipepart_constants.<key>`` and keep the
value, the very tensor the model holds, in `TracedModel.constants`.

Every module built from the graph — the traced whole and each stage — holds the constants it
reads in a `Constants` child, *outside* its parameters and buffers: no checkpoint or weight
source is asked for them, ``state_dict()`` does not list them, and a rank's materialisation
(``to_empty``, which would leave garbage in a buffer) does not touch their values. `Constants`
moves them along when the module moves (``.to(device)``, ``.cuda()``, ``to_empty(device=...)``),
keeping their dtype, as the eager model keeps the dtype of a default argument.

A plain tensor attribute of a model built on the ``meta`` device has no value to carry; moving it
to a real device raises a `PlanError` that says to register it as a buffer, so that the model's
weights (the factory's model, a checkpoint) supply it like any other buffer.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from partition.errors import PlanError, TraceError

__all__ = [
    "CONSTANTS",
    "Constants",
    "check_default_containers",
    "constant_key",
    "graph_module",
    "lift_fx_constants",
]

CONSTANTS = "_pipepart_constants"
"""The attribute under which a module built from a graph holds its `Constants`."""


def constant_key(target: str) -> str | None:
    """The key of a ``get_attr`` target that names a constant, else None."""
    prefix = CONSTANTS + "."
    return target[len(prefix) :] if target.startswith(prefix) else None


class Constants(nn.Module):
    """Tensors a graph reads that are not parameters or buffers; see [Note: tensor constants]."""

    def __init__(self, values: Mapping[str, torch.Tensor], sources: Mapping[str, str]) -> None:
        super().__init__()
        self._names = tuple(values)
        self._sources = dict(sources)
        for name, value in values.items():
            object.__setattr__(self, name, value)  # a plain attribute, not a buffer

    def values(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self._names}

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Constants:
        for name, value in self.values().items():
            probe = fn(torch.empty(0, device=value.device))  # where ``fn`` sends a tensor
            if probe.device == value.device:
                continue
            if value.device.type == "meta":
                raise PlanError(
                    f"the model's {self._sources.get(name, name)} is on the meta device (the model "
                    f"was built on meta) and is not a parameter or buffer, so no weight source "
                    f"can supply it; register it with self.register_buffer(..., persistent=False)"
                )
            object.__setattr__(self, name, value.to(probe.device))
        return self

    def extra_repr(self) -> str:
        return ", ".join(self._names)


class _Root(nn.Module):
    """What `fx.GraphModule` copies attributes from: the model, plus a `Constants` child."""

    def __init__(self, model: nn.Module, constants: Constants) -> None:
        super().__init__()
        self.training = model.training
        self.__dict__["_model"] = model
        self.__dict__[CONSTANTS] = constants

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_model"], name)


def graph_module(
    model: nn.Module,
    graph: fx.Graph,
    constants: Mapping[str, torch.Tensor],
    class_name: str,
    sources: Mapping[str, str] | None = None,
) -> fx.GraphModule:
    """``fx.GraphModule(model, graph)`` whose ``_pipepart_constants.*`` reads find ``constants``.

    Parameters, buffers and submodules are ``model``'s own objects under their qualified names; a
    buffer the model keeps non-persistent stays non-persistent.
    """
    used = {
        key: constants[key]
        for node in graph.nodes
        if node.op == "get_attr" and (key := constant_key(str(node.target))) is not None
    }
    holder = Constants(used, sources or {})
    module = fx.GraphModule(_Root(model, holder), graph, class_name)
    if used:
        setattr(module, CONSTANTS, holder)  # replaces the container GraphModule made
    _keep_non_persistent(model, module, graph)
    return module


def _keep_non_persistent(model: nn.Module, module: nn.Module, graph: fx.Graph) -> None:
    """``GraphModule`` registers every buffer it copies as persistent; undo that where the model's
    buffer is not (a rotary ``inv_freq``: no checkpoint holds it)."""
    for node in graph.nodes:
        if node.op != "get_attr" or constant_key(str(node.target)) is not None:
            continue
        owner_path, _, name = str(node.target).rpartition(".")
        try:
            owner = model.get_submodule(owner_path)
            copy = module.get_submodule(owner_path)
        except AttributeError:
            continue
        if name in owner._non_persistent_buffers_set and name in copy._buffers:
            copy._non_persistent_buffers_set.add(name)


# --- the fx route -------------------------------------------------------------------------------


def lift_fx_constants(
    model: nn.Module, graph: fx.Graph, bound: Mapping[str, Any], added: set[str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Turn ``graph``'s tensor constants into ``_pipepart_constants`` reads; returns the values
    and a description of each (for messages). See [Note: tensor constants].

    Args:
        model: the traced model.
        graph: a symbolically traced graph of ``model`` (changed in place).
        bound: the forward arguments the caller gave.
        added: attributes fx set on ``model`` while tracing (``_tensor_constant0``); removed.
    """
    owned = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    owned |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    values: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    taken: dict[int, str] = {}

    def key_for(value: torch.Tensor, wanted: str, source: str) -> str:
        if id(value) in taken:
            return taken[id(value)]
        key = re.sub(r"\W", "_", wanted)
        while key in values:
            key += "_"
        values[key], sources[key], taken[id(value)] = value, source, key
        return key

    signature = inspect.signature(model.forward)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    anchor = placeholders[-1].next if placeholders else None
    for node in placeholders:  # first: a default's get_attr fx made is the same tensor
        name = str(node.target).lstrip("*")
        parameter = signature.parameters.get(name)
        if name in bound and _holds_tensors(node.args):
            node.args = ()  # the caller gives it: a tensor default cannot be written in code
            continue
        if name in bound or parameter is None or not isinstance(parameter.default, torch.Tensor):
            continue
        key = key_for(parameter.default, f"default_{name}", f"default of argument {name!r}")
        with graph.inserting_before(anchor):
            read = graph.get_attr(f"{CONSTANTS}.{key}")
        node.replace_all_uses_with(read)
        graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op != "get_attr" or str(node.target) in owned:
            continue
        value = _attr(model, str(node.target))
        if not isinstance(value, torch.Tensor):
            continue
        fresh = str(node.target) in added
        source = "tensor made in forward" if fresh else f"tensor attribute {node.target!r}"
        node.target = f"{CONSTANTS}.{key_for(value, str(node.target), source)}"
        if not node.users:  # what fx made for a default argument, now read elsewhere
            graph.erase_node(node)
    for name in added:
        if name in model.__dict__:
            delattr(model, name)
    return values, sources


def _holds_tensors(value: Any) -> bool:
    leaves = torch.utils._pytree.tree_leaves(value)
    return any(isinstance(v, (torch.Tensor, fx.Node)) for v in leaves)


def _attr(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for atom in target.split("."):
        obj = getattr(obj, atom, None)
    return obj


def check_default_containers(model: nn.Module, bound: Mapping[str, Any]) -> None:
    """A default argument holding tensors inside a container cannot be lifted: say so."""
    for name, parameter in inspect.signature(model.forward).parameters.items():
        default = parameter.default
        if name in bound or isinstance(default, torch.Tensor):
            continue
        if _holds_tensors(default):
            raise TraceError(
                f"{type(model).__name__}.forward's default for {name!r} holds tensors inside a "
                f"{type(default).__name__}; pass {name}=... explicitly with the inputs"
            )
