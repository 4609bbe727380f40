"""Turning a split of the linear order into one runnable `torch.fx.GraphModule` per stage.

Stage ``s`` holds the nodes ``bounds[s] .. bounds[s+1]-1`` of the `LinearGraph` order. Its inputs
are the wires into it, its outputs the wires into the next stage (`partition.wires`: the tensors
live across a cut, in producer order), so stage ``s``'s outputs are exactly stage ``s+1``'s
inputs. The last stage returns the model's own output structure.

* Parameters keep their fully-qualified names: each stage module is built with
  ``GraphModule(model, graph)``, which installs the submodules and attributes it uses under their
  original paths, so ``stage.module.state_dict()`` keys are the whole model's keys. Parameters are
  shared with the model, never copied — a model on ``meta`` splits without allocating.
* A parameter read by two stages (a tied embedding and LM head) appears in both; the plan lists
  it under ``shared_params`` and the runtime sums its gradient across the stages that hold it.
* Tensor constants (a tensor default argument, a plain tensor attribute, a tensor made in
  ``forward``) are not sent either: each stage holds those it reads, outside its parameters and
  buffers (see [Note: tensor constants] in `partition.trace.tensor_constants`).
* In-place ops (see [Note: in-place ops] in `partition.trace.inplace`): tensors that share storage
  cross a cut as one tensor, and a stage rebuilds the others from it (the result of ``relu_`` is
  the tensor it wrote; a view of written storage is taken again from its base after the cut). A
  stage that writes in place into an activation it receives (``nn.ReLU(inplace=True)`` as its
  first op) starts with a ``clone`` of it: received activations are leaves that require grad,
  which autograd does not let an in-place op write. Other stages are unchanged.
* Python values that are not tensors (sizes, dtypes) are never sent: a stage that needs one from
  an earlier stage gets the value shape propagation found, as a constant. They depend only on
  shapes, which the plan fixes per micro-batch. A ``torch.device`` is recomputed from the stage's
  first input tensor instead. Any other value used across a cut is refused
  (`partition.wires.live_tensors`).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_unflatten

from partition.errors import PlanError
from partition.graph import LinearGraph
from partition.trace.inplace import derived_from, mutated_by
from partition.trace.tensor_constants import constant_key, graph_module
from partition.trace.traced import TracedModel
from partition.wires import (
    TensorSpec,
    Wire,
    leaf,
    live_tensors,
    tensor_paths,
    wire_name,
    wire_spec,
)

__all__ = ["Stage", "split"]


@dataclass(eq=False)
class Stage:
    """One pipeline stage: a runnable module and what it receives and sends."""

    index: int
    module: fx.GraphModule
    inputs: tuple[TensorSpec, ...]
    """What the stage's ``forward`` takes, in order (model inputs for stage 0)."""
    outputs: tuple[TensorSpec, ...]
    """What it returns, in order (for the last stage: the model's output tensors, flattened)."""
    nodes: tuple[str, ...]
    params: tuple[str, ...]
    """Qualified names of the parameters and buffers the stage holds."""
    is_last: bool

    def __call__(self, *args: Any) -> Any:
        return self.module(*args)


def split(traced: TracedModel, graph: LinearGraph, bounds: Sequence[int]) -> list[Stage]:
    """Build the stage modules for ``bounds`` (``0 = b0 < b1 < ... < bk = len(graph)``).

    Raises:
        PlanError: the bounds do not describe a contiguous split of ``graph`` into non-empty
            stages, ``graph`` was not made from ``traced``, or a value that cannot cross a cut
            is used across one (see `partition.wires`).
    """
    n = len(graph)
    bounds = list(bounds)
    if (
        len(bounds) < 2
        or bounds[0] != 0
        or bounds[-1] != n
        or any(a >= b for a, b in itertools.pairwise(bounds))
    ):
        raise PlanError(f"bounds {bounds} do not split {n} nodes into non-empty contiguous stages")
    by_name = {node.name: node for node in traced.graph.nodes}
    missing = [name for name in graph.names if name not in by_name]
    if missing:
        raise PlanError(f"the plan's nodes {missing[:3]} are not in this model's graph")
    order = [by_name[name] for name in graph.names]
    output_node = next(node for node in traced.graph.nodes if node.op == "output")
    stage_of = {}
    for s in range(len(bounds) - 1):
        for i in range(bounds[s], bounds[s + 1]):
            stage_of[order[i]] = s
    live = live_tensors(traced, order, bounds)
    stages = []
    for s in range(len(bounds) - 1):
        stages.append(
            _build_stage(
                traced,
                s,
                order[bounds[s] : bounds[s + 1]],
                live[s],
                live[s + 1] if s + 1 < len(bounds) - 1 else None,
                output_node,
                stage_of,
            )
        )
    return stages


def _build_stage(
    traced: TracedModel,
    index: int,
    nodes: list[fx.Node],
    inputs: list[Wire],
    outputs: list[Wire] | None,
    output_node: fx.Node,
    stage_of: dict[fx.Node, int],
) -> Stage:
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    by_name = {node.name: node for node in traced.graph.nodes}
    first_tensor: fx.Node | None = None
    received: dict[fx.Node, dict[tuple[int, ...], fx.Node]] = {}
    written = mutated_by(nodes) if index > 0 else set()
    copies: list[tuple[fx.Node, fx.Node]] = []
    for wire in inputs:
        node, path = wire
        placeholder = graph.placeholder(wire_name(wire))
        value = leaf(node.meta["val"], path)
        placeholder.meta["val"] = value
        received.setdefault(node, {})[path] = placeholder
        first_tensor = first_tensor or placeholder
        if node.name in written and value.is_floating_point():
            copies.append((node, placeholder))
    for node, placeholder in copies:  # see the module docstring: an in-place op on a leaf
        copy = graph.call_method("clone", (placeholder,))
        copy.meta = dict(placeholder.meta)
        paths = received[node]
        paths.update({p: copy for p, ph in paths.items() if ph is placeholder})
    for node, leaves in received.items():
        env[node] = _rebuild(node.meta["val"], leaves)
    param_names: list[str] = []

    def lookup(arg: fx.Node) -> Any:
        if arg in env:
            return env[arg]
        derived = derived_from(arg)
        if derived is not None and derived[0][0] in by_name:  # made earlier, never sent
            (name, i), is_view = derived
            if is_view:  # taken again from its base, so that writes are seen through both
                env[arg] = graph.node_copy(arg, lookup)
            else:  # the result of an in-place op: the tensor it wrote
                path = tensor_paths(by_name[name].meta.get("val"))[i]
                env[arg] = _select(graph, lookup(by_name[name]), path)
            return env[arg]
        if arg.op == "get_attr" or arg.name in traced.param_placeholders:
            target = traced.param_placeholders.get(arg.name, str(arg.target))
            env[arg] = graph.get_attr(target)
            env[arg].meta = dict(arg.meta)
            if constant_key(target) is None:  # constants are no parameters or buffers
                param_names.append(target)
            return env[arg]
        value = arg.meta.get("val")
        if isinstance(value, torch.Tensor):
            raise PlanError(f"stage {index} needs tensor {arg.name!r} that no earlier stage sends")
        if isinstance(value, torch.device):
            if first_tensor is None:
                raise PlanError(f"stage {index} needs the device of {arg.name!r} but has no input")
            env[arg] = graph.call_function(getattr, (first_tensor, "device"))
            return env[arg]
        return value  # a shape-derived constant

    for node in nodes:
        if node.op == "placeholder" and node.name not in traced.param_placeholders:
            if node not in env:  # a non-tensor model input (None, a constant)
                env[node] = node.meta.get("val")
            continue
        if node.name in traced.param_placeholders or node.op == "get_attr":
            continue  # made where a node of this stage reads it (see `lookup`), never sent
        env[node] = graph.node_copy(node, lookup)
        if node.op == "call_module":
            prefix = f"{node.target}."
            param_names += [prefix + k for k in traced.meta_state.module_state(str(node.target))]
    is_last = outputs is None
    if is_last:
        result = fx.node.map_arg(output_node.args[0], lookup)
        if traced.out_spec is not None:  # export: a flat tuple; the model's own structure
            result = graph.call_function(_Unflatten(traced.out_spec), tuple(result))  # type: ignore[arg-type]
        out_nodes = [a for a in _flat_nodes(output_node.args[0])]
        out_specs = tuple(
            TensorSpec.of(a.name, a.meta["val"])
            for a in out_nodes
            if isinstance(a.meta.get("val"), torch.Tensor)
        )
        graph.output(result)
    else:
        graph.output(tuple(_select(graph, lookup(node), path) for node, path in outputs or []))
        out_specs = tuple(wire_spec(wire) for wire in outputs or [])
    module = graph_module(
        traced.model, graph, traced.constants, f"Stage{index}", traced.constant_sources
    )
    in_specs = tuple(wire_spec(wire) for wire in inputs)
    return Stage(
        index=index,
        module=module,
        inputs=in_specs,
        outputs=out_specs,
        nodes=tuple(node.name for node in nodes),
        params=tuple(dict.fromkeys(param_names)),
        is_last=is_last,
    )


class _Unflatten:
    """The last stage's output in the model's own structure (export graphs return it flat)."""

    __name__ = "unflatten_output"  # what the stage's code calls it

    def __init__(self, spec: Any) -> None:
        self.spec = spec

    def __call__(self, *leaves: Any) -> Any:
        return tree_unflatten(list(leaves), self.spec)


def _flat_nodes(value: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(value, lambda n: found.append(n) or n)  # type: ignore[func-returns-value]
    return found


def _rebuild(
    value: Any, leaves: dict[tuple[int, ...], fx.Node], prefix: tuple[int, ...] = ()
) -> Any:
    """``value``'s structure with received placeholders at its tensors (None elsewhere)."""
    if prefix in leaves:
        return leaves[prefix]
    if isinstance(value, (tuple, list)):
        return type(value)(_rebuild(v, leaves, (*prefix, i)) for i, v in enumerate(value))
    return value if not isinstance(value, torch.Tensor) else None


def _select(graph: fx.Graph, value: Any, path: tuple[int, ...]) -> Any:
    """The node for the tensor at ``path`` inside ``value`` (a node or a structure of nodes)."""
    for i in path:
        if isinstance(value, fx.Node):
            value = graph.call_function(operator.getitem, (value, i))
        else:
            value = value[i]
    return value
