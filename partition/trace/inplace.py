"""In-place ops in a traced graph: which nodes write into which values, and which share a tensor.

[Note: in-place ops]
``nn.ReLU(inplace=True)``, ``x.add_(y)``, ``t.div_(n)``, ``bernoulli_``, ``aten.relu_`` in an
export graph, BatchNorm's running statistics: an in-place op writes into a tensor another node
made. Nothing in a node's name says so reliably (a module with ``inplace=True``, an ATen overload
with a mutable schema, ``x[:, :2].mul_(2)`` writing through a view), so shape propagation watches
instead: before each node runs it notes the version counter of every tensor the node receives,
and afterwards records

* ``node.meta[MUTATES]``: the nodes whose values it wrote — the argument itself, the node that
  first made that tensor object, and, for a view, the node that made its base (a view and its
  base share one version counter);
* ``node.meta[ALIAS]``: ``(producer, index)`` when the node returns one of its inputs as is (the
  tensor object itself: every in-place op does, and so do ``contiguous()`` on a contiguous tensor
  or a ``getitem`` of a tuple) — the first node that made that tensor, and its index there;
* ``node.meta[VIEW_OF]``: for a view (``x[:, :2]``, ``x.transpose(1, 2)``) of its one tensor
  input whose storage something in the graph writes in place, the name of that input.

Who uses it:

* the cost model keys saved tensors by `alias_key`, so a buffer that an in-place op rewrites and a
  later node saves again is counted once, and it runs a writing node on clones of the inputs it
  writes (a fresh leaf that requires grad may not be written in place; see `partition.cost`);
* the profiler clones the inputs a node writes before each timed run (and subtracts the clone);
* the stages' wires (`partition.split`) and the cut widths (`partition.graph`) keep tensors that
  share storage together across a cut (`derived_from`): the result of an in-place op is the
  tensor it wrote, and a view of written storage is taken again from its base after the cut, so
  that a write on one side is seen through the other, as in the eager model;
* `partition.split` clones, at the top of a stage, the received activations the stage writes in
  place: they arrive as leaves that require grad, on which autograd refuses an in-place op. Only
  those stages pay for the copy; the gradient is unchanged (``clone`` passes it through).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

__all__ = [
    "ALIAS",
    "MUTATES",
    "VIEW_OF",
    "VersionWatch",
    "alias_key",
    "derived_from",
    "mutated_by",
    "mutates",
]

MUTATES = "pipepart_mutates"
ALIAS = "pipepart_alias"
VIEW_OF = "pipepart_view_of"

Key = tuple[str, int]
"""A tensor of the graph: the node that made it and its index among the node's tensor leaves."""


def _leaves(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


class VersionWatch:
    """Records `MUTATES`, `ALIAS` and `VIEW_OF` while a graph's nodes run one after another."""

    def __init__(self) -> None:
        self._owner: dict[int, Key] = {}
        """id of every tensor object seen → the first node that produced it."""
        self._before: list[tuple[str, torch.Tensor, int]] = []
        self._views: dict[str, str] = {}
        """A view node → its one tensor input (whether its storage is written is known at the end)."""

    def produced(self, node: fx.Node, value: Any) -> None:
        """``node`` made ``value`` (a placeholder's input, a node's result)."""
        for index, t in enumerate(_leaves(value)):
            self._owner.setdefault(id(t), (node.name, index))

    def before(self, node: fx.Node, values: dict[str, Any]) -> None:
        """Note the versions of the tensors ``node`` is about to receive."""
        self._before = [
            (arg.name, t, t._version)
            for arg in node.all_input_nodes
            for t in _leaves(values.get(arg.name))
        ]

    def after(self, node: fx.Node, value: Any) -> None:
        """Record what ``node`` wrote and what it returned; then note ``value``."""
        written: dict[str, None] = {}
        single = self._before[0] if len(self._before) == 1 else None  # one tensor in
        for name, t, version in self._before:
            if t._version == version:
                continue
            written[name] = None
            for tensor in (t, t._base):
                if tensor is not None and id(tensor) in self._owner:
                    written[self._owner[id(tensor)][0]] = None
        self._before = []
        if written:
            node.meta[MUTATES] = tuple(written)
        if isinstance(value, torch.Tensor):
            if id(value) in self._owner:
                node.meta[ALIAS] = self._owner[id(value)]
            elif value._base is not None and single is not None:
                name, source, _ = single
                if value._base is source or value._base is source._base:
                    self._views[node.name] = name
        self.produced(node, value)

    def finish(self, graph: fx.Graph) -> None:
        """Mark the views whose storage some node writes (`VIEW_OF`)."""
        by_name = {node.name: node for node in graph.nodes}

        def root(name: str) -> str:
            while True:
                node = by_name[name]
                if ALIAS in node.meta and node.meta[ALIAS][0] != name:
                    name = str(node.meta[ALIAS][0])
                elif name in self._views:
                    name = self._views[name]
                else:
                    return name

        written = {root(name) for node in graph.nodes for name in mutates(node)}
        for name, source in self._views.items():
            if root(name) in written:
                by_name[name].meta[VIEW_OF] = source


def mutates(node: fx.Node) -> tuple[str, ...]:
    """Names of the nodes whose values ``node`` writes in place (empty for most nodes)."""
    return tuple(node.meta.get(MUTATES, ()))


def mutated_by(nodes: Iterable[fx.Node]) -> set[str]:
    """Names of the values any of ``nodes`` writes in place."""
    return {name for node in nodes for name in mutates(node)}


def alias_key(node_name: str, index: int, by_name: dict[str, fx.Node]) -> Key:
    """The first node that made the tensor ``(node_name, index)`` refers to (itself, unless the
    node returned one of its inputs); see [Note: in-place ops]."""
    node = by_name.get(node_name)
    if node is not None and index == 0 and ALIAS in node.meta:
        name, i = node.meta[ALIAS]
        return str(name), int(i)
    return node_name, index


def derived_from(node: fx.Node) -> tuple[Key, bool] | None:
    """Where a tensor that must not cross a cut on its own comes from, and how: ``((producer,
    index), False)`` for the result of an in-place op (that very tensor), ``((input, 0), True)``
    for a view of written storage (taken again from its input). None for every other node."""
    if VIEW_OF in node.meta:
        return (str(node.meta[VIEW_OF]), 0), True
    if MUTATES in node.meta and ALIAS in node.meta:
        name, index = node.meta[ALIAS]
        return (str(name), int(index)), False
    return None
