"""A weight group's W computed from its exit node's saved tensors, without the autograd engine.

[Note: weight gradients without the engine]
An engine call per weight group costs a traversal of the whole graph below its node (~60 us
each, 24 groups on a 4-block GPT stage) and the engine's captured gradient needed a second,
out-of-place add: I + W cost ~20 % more CPU than B. A group whose one exit is a linear layer
(``AddmmBackward0`` / ``MmBackward0`` over ``weight.t()``) or a layer norm
(``NativeLayerNormBackward0``) is computed in W from the node's saved tensors with the very op
autograd runs (``grad.t().mm(input)``, ``grad.sum(0)``, ``native_layer_norm_backward`` with
the input masked off) and added in place into ``.grad``: the same numbers as B, no engine.
Any other group, and every group under recompute (its saved tensors unpack only inside a
backward), goes through ``torch.autograd.backward(..., inputs=params)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import Node

__all__ = ["weight_grads_from_saved"]


def weight_grads_from_saved(
    nodes: Sequence[Node],
    recorded: Sequence[tuple[Tensor | None, ...] | None],
    params: Sequence[Tensor],
) -> bool:
    """Accumulate W of one weight group into ``.grad`` without the engine, where its one exit
    is a linear layer or a layer norm; see [Note: weight gradients without the engine].

    Args:
        nodes: the group's exits (autograd nodes on the input path).
        recorded: the gradients that arrived at each exit during I.
        params: the group's parameters.

    Returns:
        True when done; False (nothing done) for any other group: run it through the engine.
    """
    if len(nodes) != 1 or not recorded[0] or recorded[0][0] is None:
        return False
    node: Any = nodes[0]  # its ``_saved_*`` attributes are per node type, unknown to typing
    grad = recorded[0][0]
    kind = type(node).__name__
    edges = node.next_functions
    if kind == "AddmmBackward0":
        if node._saved_alpha != 1 or node._saved_beta != 1:
            return False
        bias, weight = _accumulator(edges[0][0]), _transposed(edges[2][0])
        if weight is None:
            return False
        weight_grad = lambda: grad.t().mm(node._saved_mat1)  # noqa: E731
        grads = [(bias, lambda: grad.sum(0)), (weight, weight_grad)]
    elif kind == "MmBackward0":
        weight = _transposed(edges[1][0])
        if weight is None:
            return False
        grads = [(weight, lambda: grad.t().mm(node._saved_self))]
    elif kind == "NativeLayerNormBackward0":

        def norm_grads() -> tuple[Tensor, Tensor, Tensor]:
            return torch.ops.aten.native_layer_norm_backward(
                grad,
                node._saved_input,
                node._saved_normalized_shape,
                node._saved_result1,
                node._saved_result2,
                node._saved_weight,
                node._saved_bias,
                [False, weight is not None, bias is not None],
            )

        weight, bias = _accumulator(edges[1][0]), _accumulator(edges[2][0])
        cache: list[tuple[Tensor, Tensor, Tensor]] = []

        def norm_part(i: int) -> Tensor:
            if not cache:  # one backward call gives both
                cache.append(norm_grads())
            return cache[0][i]

        grads = [(weight, lambda: norm_part(1)), (bias, lambda: norm_part(2))]
    else:
        return False
    expected = [p for p, _ in grads if p is not None]
    if len(expected) != len(params) or any(not any(p is q for q in expected) for p in params):
        return False  # a weight-side branch we do not know
    for param, compute in grads:
        if param is None:
            continue
        g = compute()
        if param.grad is None:
            param.grad = g
        else:
            param.grad.add_(g)
    return True


def _accumulator(node: Node | None) -> Tensor | None:
    """The parameter of an ``AccumulateGrad`` node, else None."""
    return getattr(node, "variable", None) if type(node).__name__ == "AccumulateGrad" else None


def _transposed(node: Node | None) -> Tensor | None:
    """The parameter behind ``TBackward0 -> AccumulateGrad`` (``weight.t()`` of a linear)."""
    if type(node).__name__ != "TBackward0":
        return None
    return _accumulator(node.next_functions[0][0])  # type: ignore[union-attr]
