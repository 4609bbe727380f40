"""What crosses a cut between stages: the live tensors (*wires*), their specs, and what may cross.

A *wire* is one tensor that crosses a cut: the node that made it and the index path of the tensor
inside the node's value (a node may return a tuple of tensors). The wires into stage ``s`` are the
tensors made before its first cut and used in it or after, in producer order; the model inputs
all enter at stage 0. A tensor that skips stages (a residual, an attention mask) is live across
every cut in between, so each stage's outputs are exactly the next stage's inputs.

* Parameters, buffers and attributes never cross: every stage reads those it uses itself.
* Tensors that share storage cross as one (see [Note: in-place ops] in `partition.trace.inplace`):
  the result of an in-place op is the tensor it wrote, a view of written storage is taken again
  from its base after the cut, and that first tensor stays live while any of them is used.
* Python values that are not tensors (sizes, dtypes, devices, dicts without tensors) are never
  sent: the stage that needs one rebuilds it (`partition.split`). Anything else used across a cut
  (a dict holding tensors, an object such as a dataclass, from a leaf module) could be neither
  sent nor rebuilt: `live_tensors` refuses that cut, naming the value and the module that made it.

`TensorSpec` is what the plan and the runtime know of a wire: its name, shape and dtype per
micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from partition.errors import PlanError
from partition.trace.inplace import derived_from
from partition.trace.traced import TracedModel, module_path

__all__ = [
    "TensorSpec",
    "Wire",
    "leaf",
    "live_tensors",
    "local_nodes",
    "tensor_paths",
    "wire_name",
    "wire_spec",
]


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of a tensor crossing a cut (per micro-batch)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype: torch.dtype = getattr(torch, self.dtype)
        return dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * torch.empty((), dtype=self.torch_dtype, device="meta").element_size()

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        return cls(
            name, tuple(int(d) for d in tensor.shape), str(tensor.dtype).removeprefix("torch.")
        )

    def describe(self) -> str:
        return f"{self.name}: {self.dtype}{list(self.shape)}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(str(data["name"]), tuple(int(d) for d in data["shape"]), str(data["dtype"]))


Wire = tuple[fx.Node, tuple[int, ...]]
"""A tensor crossing a cut: the node that made it and its index path inside the node's value."""


def tensor_paths(value: Any, prefix: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    """Index paths of the tensors inside a tensor, or a (nested) tuple or list of them."""
    if isinstance(value, torch.Tensor):
        return [prefix]
    if isinstance(value, (tuple, list)):
        return [p for i, v in enumerate(value) for p in tensor_paths(v, (*prefix, i))]
    return []


def leaf(value: Any, path: tuple[int, ...]) -> torch.Tensor:
    """The tensor at ``path`` inside ``value``."""
    for i in path:
        value = value[i]
    assert isinstance(value, torch.Tensor)
    return value


def wire_name(wire: Wire) -> str:
    """The name a wire has on both sides of a cut: its node's, then its path (``getitem_3_0``)."""
    node, path = wire
    return node.name + "".join(f"_{i}" for i in path)


def wire_spec(wire: Wire) -> TensorSpec:
    """The wire's spec, from the value shape propagation found for its node."""
    return TensorSpec.of(wire_name(wire), leaf(wire[0].meta["val"], wire[1]))


def local_nodes(traced: TracedModel) -> set[str]:
    """Nodes whose value every stage makes for itself: parameters and attributes."""
    return {
        node.name
        for node in traced.graph.nodes
        if node.op == "get_attr" or node.name in traced.param_placeholders
    }


def live_tensors(traced: TracedModel, order: list[fx.Node], bounds: list[int]) -> list[list[Wire]]:
    """For each stage of the split ``bounds`` of ``order``, the wires into it.

    Raises:
        PlanError: a value that is neither a tensor nor a constant is used across a cut.
    """
    n = len(order)
    position = {node: i for i, node in enumerate(order)}
    by_name = {node.name: node for node in traced.graph.nodes}
    local = local_nodes(traced)
    last_use = {}
    for node in order:
        uses = [position.get(u, n) for u in node.users]
        last_use[node] = max(uses) if uses else -1
    for node in reversed(order):  # a chain folds into its first tensor
        source = derived_from(node)
        if source is not None and by_name.get(source[0][0]) in last_use:
            first = by_name[source[0][0]]
            last_use[first] = max(last_use[first], last_use[node])
            last_use[node] = -1
    # Model inputs all enter at stage 0 (they come from the data loader), whatever their position.
    inputs = [node for node in order if node.op == "placeholder" and node.name not in local]
    live: list[list[Wire]] = [[(node, ()) for node in inputs if tensor_paths(node.meta.get("val"))]]
    for start in bounds[1:-1]:
        crossing = [
            node
            for node in order
            if (position[node] < start or node in inputs)
            and last_use[node] >= start
            and node.name not in local
        ]
        for node in crossing:
            _check_crossable(node, order[start], max(node.users, key=lambda u: position.get(u, n)))
        live.append(
            [(node, path) for node in crossing for path in tensor_paths(node.meta.get("val"))]
        )
    return live


_CONSTANTS = (
    type(None), bool, int, float, complex, str, torch.dtype, torch.device, torch.layout,
    torch.memory_format, slice, type(Ellipsis),
)  # fmt: skip


def _crossable(value: Any, tensors: bool = True) -> bool:
    """Whether ``value`` can cross a cut: tensors (in tuples and lists), and plain constants."""
    if isinstance(value, torch.Tensor):
        return tensors
    if isinstance(value, (tuple, list)):
        return all(_crossable(v, tensors) for v in value)
    if isinstance(value, dict):  # baked into the next stage as a constant: no tensor inside
        return all(_crossable(v, tensors=False) for v in value.values())
    return isinstance(value, _CONSTANTS)


def _check_crossable(node: fx.Node, first_after: fx.Node, last_user: fx.Node) -> None:
    """Raise `PlanError` if ``node``'s value, used after the cut before ``first_after``, cannot
    cross it (see the module docstring)."""
    value = node.meta.get("val")
    if _crossable(value):
        return
    made_by = module_path(node) or "the model's forward"
    raise PlanError(
        f"{node.name!r} (a {type(value).__name__}, made by {made_by}) is used after the cut "
        f"before node {first_after.name!r}, but only tensors, tuples or lists of tensors and "
        f"plain constants cross a cut. Cut before {node.name!r} or after {last_user.name!r} "
        f"(bounds=..., pipe_split()), or make {made_by} return a tensor or a tuple of tensors"
    )
