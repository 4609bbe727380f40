"""What a node of a traced graph is, independent of its name, and whether two graphs compute the
same thing: how the graphs of a model's two modes are aligned (`partition.modes.split`) and
proven equal (`partition.modes.modal.trace_modes`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from partition.trace.traced import TracedModel, module_path

__all__ = ["node_key", "same_graph"]


def node_key(node: fx.Node, traced: TracedModel) -> tuple[str, ...]:
    """What a node is, independent of its name and constants (how two graphs are aligned)."""
    if node.name in traced.param_placeholders:
        return ("tensor", traced.param_placeholders[node.name])
    if node.op in ("placeholder", "call_module", "get_attr", "output"):
        return (node.op, str(node.target))
    target = getattr(node.target, "__qualname__", None) or str(node.target)
    if not isinstance(node.target, str):
        target = f"{getattr(node.target, '__module__', '')}.{target}"
    return (node.op, target, module_path(node))


def same_graph(a: TracedModel, b: TracedModel) -> bool:
    """Whether ``a`` and ``b`` compute the same thing: node by node the same op on the same
    arguments (nodes are compared through the pairing, constants by value)."""
    nodes_a, nodes_b = list(a.graph.nodes), list(b.graph.nodes)
    if len(nodes_a) != len(nodes_b) or a.out_spec != b.out_spec:
        return False
    partner: dict[fx.Node, fx.Node] = {}
    for x, y in zip(nodes_a, nodes_b, strict=True):
        if node_key(x, a) != node_key(y, b):
            return False
        mapped = fx.node.map_arg(_canonical(x), lambda n: partner[n])
        try:
            if mapped != _canonical(y):
                return False
        except RuntimeError:  # a tensor constant compared by value: call it different
            return False
        partner[x] = y
    return True


_DROPOUTS = {
    torch.ops.aten.dropout.default,
    torch.ops.aten.feature_dropout.default,
    torch.ops.aten.alpha_dropout.default,
    torch.ops.aten.feature_alpha_dropout.default,
    torch.ops.aten.native_dropout.default,
    torch.nn.functional.dropout,
    torch.nn.functional.dropout1d,
    torch.nn.functional.dropout2d,
    torch.nn.functional.dropout3d,
    torch.nn.functional.alpha_dropout,
    torch.nn.functional.feature_alpha_dropout,
}


def _canonical(node: fx.Node) -> tuple[Any, Any]:
    """A node's arguments, with the mode flag of a dropout of probability 0 (a no-op in both
    modes: HF models built with zero dropout read it in every layer) left out."""
    args, kwargs = tuple(node.args), dict(node.kwargs)
    if node.target in _DROPOUTS:
        p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
        if p == 0:
            args = args[:2]
            kwargs.pop("training", None)
            kwargs.pop("train", None)
    return args, kwargs
