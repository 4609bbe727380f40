"""What tracing gives: `TracedModel`, a model's FX graph with shapes on every node, and the two
things every route shares — running the graph on meta to put shapes on it (`propagate_shapes`)
and the user's module path of a node (`module_path`).

Both routes (`partition.trace.fx` for fx, `partition.trace.export` for `torch.export`) build on this
module; neither imports the other's internals.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from partition.errors import TraceError
from partition.trace.inplace import VersionWatch
from partition.trace.meta import MetaState, fetch_args, run_node, to_meta
from partition.trace.tensor_constants import constant_key

__all__ = ["TracedModel", "module_path", "propagate_shapes", "route_error"]


@dataclass(eq=False)
class TracedModel:
    """A model's FX graph with shapes, and how to map its nodes back to the model."""

    module: fx.GraphModule
    """The graph; every node has ``meta["val"]``."""
    model: nn.Module
    """The traced model (its parameters are shared, never copied)."""
    method: Literal["fx", "export"]
    """The route that produced the graph."""
    input_names: tuple[str, ...]
    """The model's forward arguments that are graph inputs, in order."""
    param_placeholders: dict[str, str] = field(default_factory=dict)
    """For export graphs: placeholder name → the parameter or buffer's qualified name."""
    out_spec: Any = None
    """For export graphs: the pytree spec that rebuilds the model's output structure."""
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    """Tensor constants by key, read as ``_pipepart_constants.<key>``; see `partition.trace.tensor_constants`."""
    constant_sources: dict[str, str] = field(default_factory=dict)
    """What each constant is in the model (``"default of argument 'y'"``), for messages."""
    markers: int = 0
    """How many ``pipe_split()`` markers the forward has; see `partition.trace.markers`."""
    leaf_modules: tuple[str, ...] = ()
    """The fx route's modules kept whole, as `partition.trace.fx.leaf_names` writes them."""
    state: MetaState | None = None

    @property
    def graph(self) -> fx.Graph:
        return self.module.graph

    @property
    def meta_state(self) -> MetaState:
        if self.state is None:
            self.state = MetaState(self.model, self.constants)
        return self.state


def route_error(hit: str, ways_out: str, other_route: str) -> TraceError:
    """A `TraceError` saying what one route hit and the ways out, the other route among them.

    ``hit`` and ``ways_out`` are kept on the error apart: when both routes fail, `trace` names
    what each hit and offers each one's own ways out, not the other route that failed too.
    """
    ways = "; ".join(w for w in (ways_out, other_route) if w)
    error = TraceError(f"{hit}. Ways out: {ways}" if ways else f"{hit}.")
    error.hit, error.ways_out = hit, ways_out
    return error


def propagate_shapes(traced: TracedModel, inputs: Mapping[str, Any]) -> None:
    """Run the graph on meta values and store ``meta["val"]`` / ``meta["tensor_meta"]``.

    ``inputs`` maps placeholder names to example values (any device; converted to meta).
    """
    state = traced.meta_state
    values: dict[str, Any] = {}
    watch = VersionWatch()
    with torch.no_grad():
        for node in traced.graph.nodes:
            if node.op == "placeholder":
                if node.name in traced.param_placeholders:
                    value = state.tensor(traced.param_placeholders[node.name])
                else:
                    value = to_meta(inputs.get(node.name))
                watch.produced(node, value)
            elif node.op == "output":
                continue
            else:
                args, kwargs = fetch_args(node, values)
                watch.before(node, values)
                try:
                    value = run_node(node, args, kwargs, state)
                except Exception as e:
                    raise TraceError(
                        f"shape propagation failed at node {node.name!r} ({node.format_node()}) in "
                        f"module {module_path(node)!r}: {type(e).__name__}: {e}"
                        + _default_hint(traced, node)
                    ) from e
                watch.after(node, value)
            values[node.name] = value
            node.meta["val"] = value
            if isinstance(value, torch.Tensor):
                node.meta["tensor_meta"] = _extract_tensor_metadata(value)
    watch.finish(traced.graph)


def _default_hint(traced: TracedModel, node: fx.Node) -> str:
    """Why a node that reads a tensor default argument may fail: the graph is traced at one
    micro-batch, and a default is a constant, never split (issue 18: ``y=torch.zeros(B, D)``)."""
    for arg in node.all_input_nodes:
        key = constant_key(str(arg.target)) if arg.op == "get_attr" else None
        source = traced.constant_sources.get(key or "", "")
        value = traced.constants.get(key or "")
        if source.startswith("default of argument") and isinstance(value, torch.Tensor):
            return (
                f". The node reads the {source} (shape {list(value.shape)}), a constant: it is "
                "not split into micro-batches as inputs are, so if its first dimension is the "
                "batch, pass it as an input (model(x, y)) and it is split like one"
            )
    return ""


def module_path(node: fx.Node) -> str:
    """The user's module path a node belongs to (``"h.3.attn.c_attn"``), or ``""``."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return _clean_path(str(path))
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0]
    return ""


def _clean_path(path: str) -> str:
    # export writes "L['self'].h[0].attn" style paths in some versions; keep "h.0.attn"
    if path.startswith("L['self']"):
        path = path[len("L['self']") :].lstrip(".")
    return path.replace("[", ".").replace("]", "").replace("'", "").strip(".")
