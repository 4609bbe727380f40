"""One rank's executor of one pipeline stage: forward, backward (whole, or split in I and W), loss.

The executor knows nothing of ranks or messages: the runtime hands it a micro-batch's inputs and
later the gradients of its outputs, and gets back what to send. Between a micro-batch's forward
and its backward the executor keeps that micro-batch's inputs and outputs (and, through them,
autograd's saved tensors); parameter gradients accumulate in ``.grad`` over micro-batches.

[Note: zero-bubble backward]
A zero-bubble schedule splits backward into I (gradients of the stage's inputs, which the
previous stage is waiting for) and W (gradients of the weights, which nobody waits for). I runs
``torch.autograd.grad`` on the inputs only, with ``retain_graph=True``, and records, through
pre-hooks on the autograd nodes where a weight's gradient path leaves the input path, the
gradients arriving there. W then starts from exactly those nodes
(``torch.autograd.graph.GradientEdge``), one call per group of weights sharing them, so the
input-gradient chain is not computed twice. This is the approach of
``torch.distributed.pipelining``'s ``stage_backward_input`` / ``stage_backward_weight``, cut down.

[Note: loss scaling]
With ``loss_reduction="mean"`` each micro-batch's loss is multiplied by ``1/m`` before backward,
so the accumulated gradients equal those of the mean loss over the whole batch (the loss
function is assumed to average within a micro-batch, as ``F.cross_entropy`` does by default).
With ``"sum"`` the losses are left as they are (the loss function should sum). The loss reported
is the mean, respectively the sum, of the micro-batch losses.
"""

from __future__ import annotations

import collections
import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, Node
from torch.utils.checkpoint import checkpoint

from partition.errors import PlanError
from partition.split import Stage
from pipeline.runtime.batchnorm import recompute_contexts
from pipeline.runtime.weight_grads import weight_grads_from_saved

__all__ = ["LossFn", "StageExecutor"]

LossFn = Callable[[Any, Any], Tensor]


@dataclass
class _WeightGroup:
    """Weights whose gradient paths leave the input path at the same autograd nodes."""

    accumulators: list[Node]
    params: list[torch.nn.Parameter]
    nodes: list[Node] = field(default_factory=list)
    grads: list[tuple[Tensor | None, ...] | None] = field(default_factory=list)
    """What arrived at each node during I (filled by a pre-hook)."""


@dataclass
class _Pending:
    """What W needs after I: the weight groups, and the roots I did not reach."""

    groups: list[_WeightGroup]
    roots: list[Tensor]
    grads: list[Tensor | None]


@dataclass
class _Saved:
    """What one micro-batch keeps from its forward until its backward is done."""

    inputs: list[Tensor]
    roots: list[Tensor]
    """Tensors to differentiate: the scaled loss (last stage) or the outputs requiring grad."""
    root_index: list[int] = field(default_factory=list)
    """For a non-last stage: the index of each root among the floating-point outputs."""
    pending: _Pending | None = None
    """Set by `StageExecutor.backward_input` for the W that follows."""


class StageExecutor:
    """Runs one `Stage`'s forward and backward for one micro-batch at a time."""

    def __init__(
        self,
        stage: Stage,
        *,
        loss_fn: LossFn | None = None,
        loss_scale: float = 1.0,
        recompute: bool = False,
        autocast: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> None:
        """
        Args:
            stage: the stage, with real weights.
            loss_fn: ``loss_fn(output, target)``; required on the last stage.
            loss_scale: what each micro-batch's loss is multiplied by; see [Note: loss scaling].
            recompute: keep only the stage's inputs and recompute its forward in the backward
                (``torch.utils.checkpoint``, random state preserved).
            autocast: run forward (and loss) under ``torch.autocast`` with this dtype; outputs
                are cast back to the plan's dtypes before they are sent.
        """
        if stage.is_last and loss_fn is None:
            raise PlanError(
                f"stage {stage.index} is the last stage and needs a loss function: pass "
                "loss_fn(output, target) (a model factory gives it as its third element)"
            )
        self.stage = stage
        self.module = stage.module
        self.loss_fn = loss_fn
        self.loss_scale = loss_scale
        self.recompute = recompute
        self.autocast = autocast
        self.device = device or torch.device("cpu")
        self.losses: list[Tensor] = []
        """Unscaled, detached loss of each micro-batch run since the last `reset` (last stage)."""
        self._grad_inputs = stage.index > 0
        self._float_in = [i for i, s in enumerate(stage.inputs) if s.torch_dtype.is_floating_point]
        self._float_out = [
            i for i, s in enumerate(stage.outputs) if s.torch_dtype.is_floating_point
        ]
        self._out_dtypes = [s.torch_dtype for s in stage.outputs]
        self._saved: dict[int, _Saved] = {}
        self._params = [p for p in self.module.parameters() if p.requires_grad]
        self._direct = not recompute  # recompute's saved tensors unpack only inside backward

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        """The stage's trainable parameters (each once)."""
        return self._params

    def reset(self) -> None:
        """Forget every micro-batch in flight and the recorded losses (start of a step)."""
        self._saved.clear()
        self.losses.clear()

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def _run(self, inputs: Sequence[Tensor]) -> Any:
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(  # buffers updated once: [Note: statistics under recompute]
                self.module,
                *inputs,
                use_reentrant=False,
                context_fn=functools.partial(recompute_contexts, self.module),
            )
        return self.module(*inputs)

    def forward(
        self, microbatch: int, inputs: Sequence[Tensor], target: Any = None
    ) -> list[Tensor]:
        """Run the forward of ``microbatch``; returns the tensors to send (none on the last stage)."""
        leaves = list(inputs)
        if self._grad_inputs:
            for i in self._float_in:
                leaves[i] = leaves[i].detach().requires_grad_(True)
        with self._autocast():
            out = self._run(leaves)
            if self.stage.is_last:
                assert self.loss_fn is not None
                loss = self.loss_fn(out, target)
        if self.stage.is_last:
            self.losses.append(loss.detach())
            self._saved[microbatch] = _Saved(leaves, [loss * self.loss_scale])
            return []
        outs = self._plan_dtypes(out)
        roots, index = [], []
        for k, i in enumerate(self._float_out):
            if i < len(outs) and outs[i].requires_grad:
                roots.append(outs[i])
                index.append(k)
        self._saved[microbatch] = _Saved(leaves, roots, index)
        return outs

    def evaluate(self, inputs: Sequence[Tensor], target: Any = None) -> Any:
        """Forward without autograd: the outputs to send, or on the last stage the model's
        output (or its loss if ``target`` is given)."""
        with torch.no_grad(), self._autocast():
            out = self.module(*inputs)
            if self.stage.is_last:
                return out if target is None or self.loss_fn is None else self.loss_fn(out, target)
        return self._plan_dtypes(out)

    def _plan_dtypes(self, out: Any) -> list[Tensor]:
        """The stage's outputs as a list; under autocast, cast back to the plan's dtypes."""
        outs = list(out)
        if self.autocast is not None:
            outs = [
                t.to(d) if t.dtype != d and t.is_floating_point() else t
                for t, d in zip(outs, self._out_dtypes, strict=False)
            ]
        return outs

    def _roots(
        self, saved: _Saved, grads: Sequence[Tensor] | None
    ) -> tuple[list[Tensor], list[Tensor] | None]:
        if self.stage.is_last:
            return saved.roots, None
        assert grads is not None
        return saved.roots, [grads[k] for k in saved.root_index]

    def _input_grads(self, leaves: list[Tensor], grads: Sequence[Tensor | None]) -> list[Tensor]:
        """One gradient per floating-point input (zeros where autograd found none)."""
        return [
            g if g is not None else torch.zeros_like(t) for t, g in zip(leaves, grads, strict=True)
        ]

    def backward(self, microbatch: int, grads: Sequence[Tensor] | None = None) -> list[Tensor]:
        """Full backward of ``microbatch`` given its outputs' gradients (None on the last stage).

        Accumulates the weights' gradients; returns the gradients of the floating-point inputs.
        """
        saved = self._saved.pop(microbatch)
        roots, root_grads = self._roots(saved, grads)
        leaves = [saved.inputs[i] for i in self._float_in] if self._grad_inputs else []
        if roots:
            torch.autograd.backward(roots, root_grads)
        return self._input_grads(leaves, [t.grad for t in leaves])

    def backward_input(
        self, microbatch: int, grads: Sequence[Tensor] | None = None
    ) -> list[Tensor]:
        """The I half of a split backward: returns the input gradients; see [Note: zero-bubble backward]."""
        saved = self._saved[microbatch]
        roots, root_grads = self._roots(saved, grads)
        grads_of = list(root_grads) if root_grads is not None else [None] * len(roots)
        leaves = [saved.inputs[i] for i in self._float_in] if self._grad_inputs else []
        found: dict[int, Tensor | None] = {}
        if roots and leaves:
            # the module's parameters now: under FSDP, the gathered ones its graph read
            live = [p for p in self.module.parameters() if p.requires_grad]
            groups, path = _weight_groups(roots, leaves, live)
            handles = [
                node.register_prehook(_recorder(group, k))
                for group in groups
                for k, node in enumerate(group.nodes)
            ]
            try:
                got = torch.autograd.grad(
                    roots, leaves, root_grads, retain_graph=True, allow_unused=True
                )
            finally:
                for h in handles:
                    h.remove()
            found = {id(t): g for t, g in zip(leaves, got, strict=True)}
            loose = [k for k, r in enumerate(roots) if _grad_node(r) not in path]
        else:
            groups, loose = [], list(range(len(roots)))
        # Roots that do not depend on the inputs were not touched by I: W starts from them.
        saved.pending = _Pending(groups, [roots[k] for k in loose], [grads_of[k] for k in loose])
        saved.inputs = []
        return self._input_grads(leaves, [found.get(id(t)) for t in leaves])

    def backward_weight(self, microbatch: int) -> None:
        """The W half of a split backward: accumulate the weights' gradients of ``microbatch``."""
        saved = self._saved.pop(microbatch)
        pending = saved.pending
        assert pending is not None, f"W of micro-batch {microbatch} before its I"
        retain = bool(pending.roots)
        for group in pending.groups:
            if self._direct and weight_grads_from_saved(group.nodes, group.grads, group.params):
                continue
            edges, grads = [], []
            for node, recorded in zip(group.nodes, group.grads, strict=True):
                for i, g in enumerate(recorded or ()):
                    if g is not None:
                        edges.append(GradientEdge(node, i))
                        grads.append(g)
            if not edges:
                continue
            # One node of a group may lie below another: pin each node's incoming gradient to
            # what I recorded there, so that nothing is counted twice.
            pins = (
                [
                    node.register_prehook(_pinned(rec))
                    for node, rec in zip(group.nodes, group.grads, strict=True)
                    if rec
                ]
                if len(group.nodes) > 1
                else []
            )
            try:
                torch.autograd.backward(edges, grads, retain_graph=retain, inputs=group.params)
            finally:
                for h in pins:
                    h.remove()
        if pending.roots:
            grads_or_none = None if any(g is None for g in pending.grads) else pending.grads
            torch.autograd.backward(pending.roots, grads_or_none)


def _recorder(group: _WeightGroup, k: int) -> Callable[[tuple[Tensor | None, ...]], None]:
    def hook(grad_outputs: tuple[Tensor | None, ...]) -> None:
        group.grads[k] = grad_outputs

    return hook


def _pinned(
    recorded: tuple[Tensor | None, ...],
) -> Callable[[tuple[Tensor | None, ...]], tuple[Tensor | None, ...]]:
    def hook(_: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
        return recorded

    return hook


def _grad_node(t: Tensor) -> Node | None:
    """The autograd node of ``t``: its ``grad_fn``, or for a leaf its gradient accumulator."""
    if t.grad_fn is not None:
        return t.grad_fn
    if not t.requires_grad:
        return None
    return t.view_as(t).grad_fn.next_functions[0][0]  # type: ignore[union-attr]


def _weight_groups(
    roots: list[Tensor], inputs: list[Tensor], params: list[torch.nn.Parameter]
) -> tuple[list[_WeightGroup], set[Node]]:
    """Group the weights by the input-path nodes their gradients leave from; see [Note: zero-bubble backward].

    The input path is every node between the roots and the inputs. A weight's *exits* are the
    nodes of the path reachable upwards from its accumulator without crossing the path; weights
    sharing an exit share a group. Returns the groups and the path.
    """
    parents: dict[Node, list[Node]] = collections.defaultdict(list)
    queue = collections.deque(n for n in map(_grad_node, roots) if n is not None)
    seen = set(queue)
    while queue:  # reverse edges of the graph below the roots
        node = queue.popleft()
        for child, _ in node.next_functions:
            if child is not None:
                parents[child].append(node)
                if child not in seen:
                    seen.add(child)
                    queue.append(child)
    path = _upwards([n for n in map(_grad_node, inputs) if n is not None], parents, set())
    group_of: dict[Node, _WeightGroup] = {}
    for param in params:
        acc = _grad_node(param)
        if acc is None or acc not in seen:
            continue  # not used by this micro-batch's graph
        exits: set[Node] = set()
        _upwards([acc], parents, path, exits)
        group = _WeightGroup([acc], [param])
        for node in exits:
            other = group_of.get(node)
            if other is not None and other is not group:  # merge the group already there
                group.accumulators += other.accumulators
                group.params += other.params
                group.nodes += [n for n in other.nodes if n not in exits]
                for n in other.nodes:
                    group_of[n] = group
        group.nodes += list(exits)
        for node in group.nodes:
            group_of[node] = group
    groups = list({id(g): g for g in group_of.values()}.values())
    for group in groups:
        group.grads = [None] * len(group.nodes)
    return groups, path


def _upwards(
    start: list[Node],
    parents: dict[Node, list[Node]],
    stop: set[Node],
    hit: set[Node] | None = None,
) -> set[Node]:
    """Nodes reachable upwards (towards the roots) from ``start``; nodes in ``stop`` are added
    to ``hit`` and not crossed."""
    found = set(start)
    queue = collections.deque(start)
    while queue:
        for parent in parents.get(queue.popleft(), ()):
            if parent in found:
                continue
            if parent in stop:
                if hit is not None:
                    hit.add(parent)
                continue
            found.add(parent)
            queue.append(parent)
    return found
