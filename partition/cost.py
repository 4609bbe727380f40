"""The cost model: FLOPs, parameter bytes, saved-activation bytes and output bytes of every node.

Every compute node of a `TracedModel` is run once more on meta tensors (see `partition.trace.meta`):

* **FLOPs** — `torch.utils.flop_counter.FlopCounterMode` around the node's forward, and around
  ``torch.autograd.grad`` of its outputs for the backward. Summed over nodes this equals the
  counter over the whole model's forward exactly (a test checks it).
* **Uncounted ops** — the counter gives 0 FLOPs to everything but matrix products, convolutions
  and attention. So that normalisation, activations, softmax and embedding lookups still weigh on
  a stage's time, each such node is charged ``elementwise_flops`` = one FLOP per output element
  forward and two backward. They are kept apart from ``fwd_flops`` / ``bwd_flops``.
* **Parameter and buffer bytes** — the parameters and buffers a node reads, charged to the first
  node that reads them (each tensor once; a tied weight once). Parameters (what
  ``model.parameters()`` counts) and buffers (and tensor constants: ``buffer_bytes``) are kept
  apart: only parameters have gradients and optimizer state ([Note: stage memory]).
* **Saved bytes** — what autograd keeps for the backward, caught with
  ``torch.autograd.graph.saved_tensors_hooks``. Parameters are excluded (counted as weights); a
  tensor produced by one node and saved by several (a residual input) is counted once, at the
  first node that saves it; the result of an in-place op is the tensor it wrote, so a buffer that
  ``relu_`` saves and a later node saves again is counted once (see [Note: in-place ops] in
  `partition.trace.inplace`, which also says how an in-place node is run on its own). [Note: fused
  attention] Scaled-dot-product attention is the one
  exception: on meta it runs the math kernel, which saves the ``T × T`` attention matrix, but
  training runs a fused kernel (flash / memory-efficient) that saves only its inputs (q, k, v,
  the mask if any), its output and a float32 log-sum-exp per query row. The cost model charges
  that, so long sequences are not priced at hundreds of GB they never use.
* **Output bytes** — the bytes of the node's outputs: what crosses a cut placed right after it.

Optionally `partition.profile` measures each node's forward and backward time on a real device.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import FlopCounterMode

from partition.trace.inplace import alias_key, mutates
from partition.trace.meta import fetch_args, run_node
from partition.trace.tensor_constants import CONSTANTS
from partition.trace.traced import TracedModel, module_path

__all__ = ["CostGraph", "NodeCost", "cost_model", "tensor_bytes"]


@dataclass(frozen=True, kw_only=True)
class NodeCost:
    """Costs of one graph node, per micro-batch of the traced size."""

    name: str
    op: str
    module_path: str
    fwd_flops: int = 0
    bwd_flops: int = 0
    elementwise_flops: int = 0
    """FLOP-equivalents charged to ops the FLOP counter does not count (forward + backward)."""
    param_bytes: int = 0
    param_numel: int = 0
    """Bytes and elements of the parameters this node owns (not buffers)."""
    buffer_bytes: int = 0
    """Bytes of the buffers and tensor constants this node owns (no gradient, no optimizer)."""
    params: tuple[str, ...] = ()
    """Qualified names of the parameters and buffers this node owns."""
    saved_bytes: int = 0
    output_bytes: int = 0
    fwd_time: float | None = None
    """Measured forward seconds on the profiled device, if profiled."""
    bwd_time: float | None = None

    @property
    def flops(self) -> int:
        """Forward + backward FLOPs including the elementwise charge."""
        return self.fwd_flops + self.bwd_flops + self.elementwise_flops


@dataclass(eq=False)
class CostGraph:
    """A traced model with a `NodeCost` per node (graph order) and tensor bytes per edge."""

    traced: TracedModel
    nodes: dict[str, NodeCost]
    edges: dict[tuple[str, str], int]
    profiled_flops: float | None = None
    """FLOP/s of the device the measured times came from (see `partition.profile`)."""
    info: dict[str, Any] = field(default_factory=dict)

    def __iter__(self) -> Iterator[NodeCost]:
        return iter(self.nodes.values())

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def fwd_flops(self) -> int:
        return sum(c.fwd_flops for c in self)

    @property
    def param_bytes(self) -> int:
        return sum(c.param_bytes for c in self)

    @property
    def param_numel(self) -> int:
        """The model's parameter count, ``sum(p.numel() for p in model.parameters())``."""
        return sum(c.param_numel for c in self)

    def to_networkx(self) -> nx.DiGraph:
        """The graph as a `networkx.DiGraph`: node attributes from `NodeCost`, edge ``bytes``."""
        graph = nx.DiGraph()
        for c in self:
            graph.add_node(c.name, **{k: getattr(c, k) for k in NodeCost.__dataclass_fields__})
        for (src, dst), size in self.edges.items():
            graph.add_edge(src, dst, bytes=size)
        return graph


def tensor_bytes(value: Any) -> int:
    """Bytes of every tensor in a (nested) value."""
    leaves, _ = tree_flatten(value)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


def cost_model(traced: TracedModel) -> CostGraph:
    """Cost every node of ``traced`` on meta tensors; see the module docstring for the rules."""
    state = traced.meta_state
    graph = traced.graph
    values: dict[str, Any] = {n.name: n.meta.get("val") for n in graph.nodes}
    owned: set[int] = set()  # ids of parameter tensors already charged
    saved_once: set[tuple[str, int]] = set()  # (producer, output index) already counted as saved
    nodes: dict[str, NodeCost] = {}
    param_ids = {id(state.tensor(q)): q for q in _all_param_names(traced)}
    by_name = {node.name: node for node in graph.nodes}
    needs = _needs_grad(traced, values)
    for node in graph.nodes:
        if node.op == "output":
            continue
        params = _params_of(node, traced)
        new_params = [q for q in params if id(state.tensor(q)) not in owned]
        for q in new_params:
            owned.add(id(state.tensor(q)))
        held = [state.tensor(q) for q in new_params]
        weights = [t for t in held if isinstance(t, torch.nn.Parameter)]
        param_numel = sum(t.numel() for t in weights)
        param_bytes = tensor_bytes(weights)
        buffer_bytes = tensor_bytes(held) - param_bytes  # buffers and tensor constants
        output_bytes = tensor_bytes(values[node.name])
        base = dict(
            name=node.name,
            op=node.op,
            module_path=module_path(node),
            param_bytes=param_bytes,
            param_numel=param_numel,
            buffer_bytes=buffer_bytes,
            params=tuple(new_params),
            output_bytes=output_bytes,
        )
        if node.op in ("placeholder", "get_attr"):
            nodes[node.name] = NodeCost(**base)
            continue
        fwd, bwd, saved_keys, saved_new = _cost_node(
            node, values, traced, param_ids, by_name, needs
        )
        saved_bytes = saved_new
        for key, size in saved_keys.items():
            if key not in saved_once:
                saved_once.add(key)
                saved_bytes += size
        elementwise = 0
        if fwd == 0 and output_bytes:
            numel = sum(
                t.numel() for t in tree_flatten(values[node.name])[0] if isinstance(t, torch.Tensor)
            )
            elementwise = 3 * numel if needs[node.name] else numel
        nodes[node.name] = NodeCost(
            **base,
            fwd_flops=fwd,
            bwd_flops=bwd,
            elementwise_flops=elementwise,
            saved_bytes=saved_bytes,
        )
    edges: dict[tuple[str, str], int] = {}
    for node in graph.nodes:
        for user in node.users:
            if user.op != "output":
                edges[(node.name, user.name)] = tensor_bytes(values[node.name])
    return CostGraph(traced=traced, nodes=nodes, edges=edges)


def _all_param_names(traced: TracedModel) -> list[str]:
    """Parameters, buffers and tensor constants: what a stage holds rather than computes."""
    return (
        [q for q, _ in traced.model.named_parameters(remove_duplicate=False)]
        + [q for q, _ in traced.model.named_buffers(remove_duplicate=False)]
        + [f"{CONSTANTS}.{key}" for key in traced.constants]
    )


def _params_of(node: fx.Node, traced: TracedModel) -> list[str]:
    """Qualified names of the parameters and buffers ``node`` reads directly."""
    state = traced.meta_state
    if node.op == "call_module":
        prefix = f"{node.target}."
        return [prefix + k for k in state.module_state(str(node.target))]
    if node.op == "get_attr" and state.has(str(node.target)):
        return [str(node.target)]
    if node.op in ("call_function", "call_method"):
        names = []
        for arg in node.all_input_nodes:
            if arg.op == "placeholder" and arg.name in traced.param_placeholders:
                names.append(traced.param_placeholders[arg.name])
        return names
    return []


def _needs_grad(traced: TracedModel, values: dict[str, Any]) -> dict[str, bool]:
    """Which nodes' values training differentiates: those a parameter or a floating model input
    flows into. A buffer, a constant, a mask made from integer inputs, and whatever only they
    make, are not — the cost model neither asks autograd for their gradient (``F.batch_norm``
    refuses one for ``running_mean``) nor charges their backward."""
    state = traced.meta_state
    needs: dict[str, bool] = {}
    for node in traced.graph.nodes:
        if node.op == "placeholder":
            if node.name in traced.param_placeholders:
                needs[node.name] = _has_grad(values[node.name])
            else:
                needs[node.name] = any(
                    isinstance(t, torch.Tensor) and t.is_floating_point()
                    for t in tree_flatten(values[node.name])[0]
                )
        elif node.op == "get_attr":
            target = str(node.target)
            needs[node.name] = state.has(target) and state.tensor(target).requires_grad
        else:
            needs[node.name] = any(needs.get(a.name, False) for a in node.all_input_nodes) or (
                node.op == "call_module"
                and any(p.requires_grad for p in state.module_state(str(node.target)).values())
            )
    return needs


def _has_grad(value: Any) -> bool:
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_flatten(value)[0])


def _leafify(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().requires_grad_(True)
    return value


def _detached(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


def _cost_node(
    node: fx.Node,
    values: dict[str, Any],
    traced: TracedModel,
    param_ids: dict[int, str],
    by_name: dict[str, fx.Node],
    needs: dict[str, bool],
) -> tuple[int, int, dict[tuple[str, int], int], int]:
    """Forward FLOPs, backward FLOPs, saved inputs keyed by producer, bytes of other saved tensors.

    Each input that training differentiates (``needs``, see `_needs_grad`) is a fresh leaf, the
    others are detached; an input the node writes in place is a clone of its leaf (an
    in-place op may not write a leaf that requires grad), and the backward is taken to the leaf.
    """
    inputs: dict[str, Any] = {}
    written = set(mutates(node))
    leaf_of: dict[int, torch.Tensor] = {}  # id of such a clone -> its leaf
    for arg in node.all_input_nodes:
        if arg.op == "placeholder" and arg.name in traced.param_placeholders:
            inputs[arg.name] = values[arg.name]  # a parameter: keep it as is
        elif not needs[arg.name]:
            inputs[arg.name] = tree_map(_detached, values[arg.name])
        else:
            inputs[arg.name] = tree_map_leaf(values[arg.name])
            if arg.name in written:
                inputs[arg.name] = tree_map(lambda t: _writable(t, leaf_of), inputs[arg.name])
    producer_of: dict[int, tuple[str, int]] = {}
    for name, value in inputs.items():
        for index, leaf in enumerate(tree_flatten(value)[0]):
            if isinstance(leaf, torch.Tensor):
                producer_of[id(leaf)] = (name, index)
    args, kwargs = fetch_args(node, inputs)
    saved: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[id(t)] = t
        return t

    counter = FlopCounterMode(display=False)
    try:
        with (
            torch.enable_grad(),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            counter,
        ):
            out = run_node(node, args, kwargs, traced.meta_state)
    except RuntimeError as e:
        if "Autograd not support dtype" not in str(e):
            raise
        # an op autograd refuses (a float input cast to an integer result, as MoE routing's
        # cumsum(..., dtype=int32) of counts): it has no gradient, so cost it without one
        args, kwargs = tree_map(_detached, (args, kwargs))
        saved.clear()
        counter = FlopCounterMode(display=False)
        with counter:
            out = run_node(node, args, kwargs, traced.meta_state)
    fwd = counter.get_total_flops()
    if _is_attention(node):
        saved = _fused_attention_saved(args, kwargs, out)
    for index, leaf in enumerate(tree_flatten(out)[0]):
        if isinstance(leaf, torch.Tensor):
            producer_of[id(leaf)] = (node.name, index)
    saved_inputs: dict[tuple[str, int], int] = {}
    saved_other = 0
    for key, t in saved.items():
        size = t.numel() * t.element_size()
        if _is_parameter(t, param_ids):
            continue
        if key in producer_of:
            saved_inputs[alias_key(*producer_of[key], by_name)] = size
        else:
            saved_other += size
    bwd = 0
    outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
    wrt = [
        leaf_of.get(id(t), t)
        for t in tree_flatten((args, kwargs))[0]
        if isinstance(t, torch.Tensor) and t.requires_grad
    ]
    if node.op == "call_module":
        wrt += [
            p for p in traced.meta_state.module_state(str(node.target)).values() if p.requires_grad
        ]
    if outs and wrt:
        counter = FlopCounterMode(display=False)
        with counter:
            torch.autograd.grad(
                outs, wrt, grad_outputs=[torch.ones_like(t) for t in outs], allow_unused=True
            )
        bwd = counter.get_total_flops()
    return fwd, bwd, saved_inputs, saved_other


_ATTENTION_TARGETS = {
    torch.nn.functional.scaled_dot_product_attention,
    torch.ops.aten.scaled_dot_product_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _is_attention(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _ATTENTION_TARGETS


def _fused_attention_saved(
    args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> dict[int, torch.Tensor]:
    """What a fused attention kernel saves; see [Note: fused attention]."""
    inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    query = inputs[0]
    output = tree_flatten(out)[0][0]
    rows = query.numel() // max(query.shape[-1], 1)  # one log-sum-exp per query row
    lse = torch.empty(rows, dtype=torch.float32, device="meta")
    return {id(t): t for t in [*inputs, output, lse]}


def _is_parameter(t: torch.Tensor, param_ids: dict[int, str]) -> bool:
    """Whether ``t`` is a parameter or a view of one (``weight.t()`` saved by a linear)."""
    while t is not None:
        if id(t) in param_ids or isinstance(t, torch.nn.Parameter):
            return True
        t = t._base  # type: ignore[assignment]
    return False


def tree_map_leaf(value: Any) -> Any:
    return tree_map(_leafify, value)


def _writable(t: Any, leaf_of: dict[int, torch.Tensor]) -> Any:
    """A clone of the leaf ``t`` that an in-place op may write (remembering the leaf)."""
    if not isinstance(t, torch.Tensor) or not t.requires_grad:
        return t
    copy = t.clone()
    leaf_of[id(copy)] = t
    return copy
