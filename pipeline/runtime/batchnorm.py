"""BatchNorm's running statistics in a pipeline: once per micro-batch, or once per batch.

A pipeline runs each stage on one micro-batch at a time, so a BatchNorm in train mode normalises
with the micro-batch's statistics and, by default (``batchnorm="microbatch"``), updates its
running statistics once per micro-batch, in micro-batch order — exactly what one process does
running the same micro-batches one after another. Two things are needed for that to hold:

* Under ``recompute=True`` the stage's forward runs again in the backward; `recompute_contexts`
  (``torch.utils.checkpoint``'s ``context_fn``) restores the statistics after that second run,
  so they are updated once. See [Note: statistics under recompute].
* ``batchnorm="batch"`` swaps each train-mode BatchNorm of a stage for a `DeferredBatchNorm`
  (the idea of torchgpipe's ``DeferredBatchNorm``): it still normalises each micro-batch with
  its own statistics, but accumulates them and updates the running statistics once, after the
  step's last micro-batch, from the statistics of everything it saw in the step — what one
  process's BatchNorm computes from the same inputs concatenated into one batch.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from partition.errors import PlanError

__all__ = [
    "DeferredBatchNorm",
    "NormTensors",
    "defer_batchnorm",
    "recompute_contexts",
    "recomputing",
]

_BATCH_NORM_OPS = {
    torch.ops.aten.batch_norm.default,
    torch.ops.aten.native_batch_norm.default,
    torch.ops.aten._native_batch_norm_legit.default,
    torch.ops.aten._native_batch_norm_legit_functional.default,
    torch.ops.aten.cudnn_batch_norm.default,
    torch.ops.aten.instance_norm.default,
}
"""ATen ops that update running statistics in place (without bumping their version)."""

_state = threading.local()


def recomputing() -> bool:
    """Whether a checkpointed forward is being recomputed (in the backward) on this thread."""
    return bool(getattr(_state, "recomputing", False))


@dataclass(frozen=True)
class NormTensors:
    """The tensors of a BatchNorm: its running statistics and its affine parameters."""

    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor | None = None
    """None when the batches are not counted (then ``momentum`` must not be None)."""
    weight: Tensor | None = None
    """None when the BatchNorm is not affine (and then so is ``bias``)."""
    bias: Tensor | None = None

    @classmethod
    def of(cls, bn: _BatchNorm) -> NormTensors:
        """The very tensors ``bn`` holds (not copies)."""
        assert bn.running_mean is not None and bn.running_var is not None
        return cls(bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.weight, bn.bias)


class DeferredBatchNorm(_BatchNorm):
    """A BatchNorm whose running statistics are updated once per ``microbatches`` forwards.

    In train mode each call normalises its input with the input's own statistics (as
    ``nn.BatchNorm*`` does) and adds them to a running total — unless it is a recomputation
    (`recomputing`). After ``microbatches`` calls the total updates ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` in place, as one call on the concatenated
    inputs would. In eval mode it is a plain BatchNorm. It holds the very tensors of the module
    (or graph) it replaces, under the same names.
    """

    def __init__(
        self,
        tensors: NormTensors,
        *,
        momentum: float | None,
        eps: float,
        microbatches: int,
        check_dim: Callable[[Any, Tensor], None] | None = None,
    ) -> None:
        """
        Args:
            tensors: the tensors to hold, under their BatchNorm names (shared, not copied).
            momentum, eps: as ``nn.BatchNorm*``'s (``momentum=None``: a cumulative average).
            microbatches: forwards per step; the running statistics move after the last.
            check_dim: the replaced class's ``_check_input_dim`` (default: at least 2-D).
        """
        super().__init__(
            tensors.running_mean.shape[0],
            eps,
            momentum,
            tensors.weight is not None,
            True,
            device="meta",
        )
        for name, value in (("weight", tensors.weight), ("bias", tensors.bias)):
            self._parameters[name] = value  # type: ignore[assignment]
        self._buffers.update(running_mean=tensors.running_mean, running_var=tensors.running_var)
        self._buffers["num_batches_tracked"] = tensors.num_batches_tracked
        self.microbatches = microbatches
        self._check_dim = check_dim
        self._seen = 0
        self._count = 0
        self._mean: Tensor | None = None
        self._m2: Tensor | None = None

    @classmethod
    def of(cls, bn: _BatchNorm, microbatches: int) -> DeferredBatchNorm:
        """The deferred twin of ``bn``, sharing its tensors and mode."""
        deferred = cls(
            NormTensors.of(bn),
            momentum=bn.momentum,
            eps=bn.eps,
            microbatches=microbatches,
            check_dim=type(bn)._check_input_dim,
        )
        deferred.train(bn.training)
        return deferred

    def _check_input_dim(self, input: Tensor) -> None:
        if self._check_dim is not None:
            self._check_dim(self, input)
        elif input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training:
            return F.batch_norm(
                input,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                False,
                0.0,
                self.eps,
            )
        out = F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)
        if not recomputing():
            self._accumulate(input.detach())
        return out

    def _accumulate(self, x: Tensor) -> None:
        """Add ``x``'s per-channel count, mean and squared deviations (Chan et al.'s update)."""
        dims = [0, *range(2, x.dim())]
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        n = x.numel() // x.shape[1]
        mean, m2 = mean.double(), var.double() * n
        if self._mean is None or self._m2 is None:
            self._mean, self._m2 = mean, m2
        else:
            delta = mean - self._mean
            total = self._count + n
            self._mean = self._mean + delta * (n / total)
            self._m2 = self._m2 + m2 + delta.square() * (self._count * n / total)
        self._count += n
        self._seen += 1
        if self._seen == self.microbatches:
            self._commit()

    @torch.no_grad()
    def _commit(self) -> None:
        assert self._mean is not None and self._m2 is not None
        assert self.running_mean is not None and self.running_var is not None
        factor = self.momentum
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if factor is None:  # a cumulative average, as nn.BatchNorm computes it
                factor = 1.0 / float(self.num_batches_tracked)
        factor = 0.0 if factor is None else factor
        unbiased = self._m2 / max(self._count - 1, 1)
        self.running_mean.mul_(1 - factor).add_(
            self._mean.to(self.running_mean.dtype), alpha=factor
        )
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        self._seen = self._count = 0
        self._mean = self._m2 = None


def defer_batchnorm(module: fx.GraphModule, microbatches: int) -> int:
    """Swap the train-mode BatchNorms of a stage for `DeferredBatchNorm`; returns how many.

    fx graphs call BatchNorm modules (``call_module``): each is replaced under its path. Export
    graphs call ``aten.batch_norm`` on the running statistics and ``add_`` the counter: the call
    becomes a ``call_module`` of a `DeferredBatchNorm` over the same tensors, and the ``add_``
    is dropped (the commit counts the batch).

    Raises:
        PlanError: an export graph updates statistics another way, or counts its batches in
            another stage.
    """
    count = 0
    graph = module.graph
    for node in list(graph.nodes):
        if node.op == "call_module":
            target = str(node.target)
            bn = module.get_submodule(target)
            if _deferrable(bn):
                module.set_submodule(target, DeferredBatchNorm.of(bn, microbatches))  # type: ignore[arg-type]
                count += 1
        elif node.op == "call_function" and node.target in _BATCH_NORM_OPS:
            count += _defer_aten(module, node, microbatches)
    if count:
        graph.lint()
        module.recompile()
    return count


def _deferrable(module: nn.Module) -> bool:
    return (
        isinstance(module, _BatchNorm)
        and not isinstance(module, (DeferredBatchNorm, nn.SyncBatchNorm))
        and module.track_running_stats
        and module.running_mean is not None
        and not isinstance(module.running_mean, nn.parameter.UninitializedBuffer)
    )


def _defer_aten(module: fx.GraphModule, node: fx.Node, microbatches: int) -> int:
    args = list(node.args)
    stats = args[3:5] if len(args) >= 5 else []
    if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in stats):
        return 0  # no running statistics: nothing to defer
    if node.target is not torch.ops.aten.batch_norm.default:
        raise PlanError(
            f"batchnorm='batch' cannot defer {node.target} (node {node.name!r}); trace the "
            "model with --trace fx, or keep batchnorm='microbatch'"
        )
    _, weight, bias, mean, var, training, momentum, eps = args[:8]
    if not training:
        return 0
    path = str(mean.target).rpartition(".")[0]  # type: ignore[union-attr]
    counter = f"{path}.num_batches_tracked" if path else "num_batches_tracked"
    adds = [
        user
        for attr in module.graph.nodes
        if attr.op == "get_attr" and attr.target == counter
        for user in attr.users
        if user.target is torch.ops.aten.add_.Tensor
    ]
    if not adds:
        raise PlanError(
            f"the BatchNorm at {path!r} counts its batches outside the stage that normalises "
            f"(node {node.name!r}); choose bounds that keep the BatchNorm in one stage, or keep "
            "batchnorm='microbatch'"
        )
    tensors = NormTensors(
        running_mean=module.get_buffer(str(mean.target)),  # type: ignore[union-attr]
        running_var=module.get_buffer(str(var.target)),  # type: ignore[union-attr]
        num_batches_tracked=module.get_buffer(counter),
        weight=module.get_parameter(str(weight.target)) if isinstance(weight, fx.Node) else None,
        bias=module.get_parameter(str(bias.target)) if isinstance(bias, fx.Node) else None,
    )
    deferred = DeferredBatchNorm(
        tensors,
        momentum=float(momentum),  # type: ignore[arg-type]
        eps=float(eps),  # type: ignore[arg-type]
        microbatches=microbatches,
    )
    module.set_submodule(path, deferred)
    with module.graph.inserting_before(node):
        call = module.graph.call_module(path, (args[0],))
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    module.graph.erase_node(node)
    for add in adds:
        attr = add.args[0]
        if not add.users:
            module.graph.erase_node(add)
        if isinstance(attr, fx.Node) and not attr.users:
            module.graph.erase_node(attr)
    return 1


# --- recompute --------------------------------------------------------------------------------

_STATS: weakref.WeakKeyDictionary[nn.Module, list[Tensor]] = weakref.WeakKeyDictionary()


def _statistics(module: nn.Module) -> list[Tensor]:
    """The buffers of ``module`` that normalisation layers update in place (cached)."""
    found = _STATS.get(module)
    if found is None:
        tensors: dict[int, Tensor] = {}
        for sub in module.modules():
            if isinstance(sub, _NormBase):
                tensors.update((id(b), b) for b in sub.buffers(recurse=False) if b is not None)
        if isinstance(module, fx.GraphModule):
            for node in module.graph.nodes:
                if node.op == "call_function" and node.target in _BATCH_NORM_OPS:
                    for arg in node.args:
                        if isinstance(arg, fx.Node) and arg.op == "get_attr":
                            value = (
                                module.get_buffer(str(arg.target))
                                if _is_buffer(module, arg)
                                else None
                            )
                            if value is not None:
                                tensors[id(value)] = value
        found = _STATS[module] = list(tensors.values())
    return found


def _is_buffer(module: nn.Module, node: fx.Node) -> bool:
    try:
        module.get_buffer(str(node.target))
    except AttributeError:
        return False
    return True


def recompute_contexts(module: nn.Module) -> tuple[_Forward, _Recompute]:
    """``context_fn`` for ``torch.utils.checkpoint`` around ``module``: (forward, recompute).

    [Note: statistics under recompute]
    The forward notes which buffers it changed (their version counters move). Each
    recomputation (there may be several: a split backward recomputes in I and again in W)
    snapshots those and the normalisation statistics (which ATen's batch norm updates without
    moving a version counter), runs with `recomputing` set — `DeferredBatchNorm` then adds
    nothing — and puts the snapshot back, so every buffer ends as if the forward ran once.
    Both context managers can be entered again, as checkpoint may.
    """
    forward = _Forward(module)
    return forward, _Recompute(module, forward.changed)


class _Forward:
    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.changed: list[Tensor] = []
        self._versions: list[tuple[Tensor, int]] = []

    def __enter__(self) -> None:
        self._versions = [(b, b._version) for b in self.module.buffers()]

    def __exit__(self, *exc: object) -> None:
        self.changed.extend(b for b, v in self._versions if b._version != v)
        self._versions = []


class _Recompute:
    def __init__(self, module: nn.Module, changed: list[Tensor]) -> None:
        self.module = module
        self.changed = changed
        self._saved: list[tuple[Tensor, Tensor]] = []
        self._previous = False

    def __enter__(self) -> None:
        watched = {id(b): b for b in [*_statistics(self.module), *self.changed]}
        self._saved = [(b, b.clone()) for b in watched.values()]
        self._previous = recomputing()
        _state.recomputing = True

    def __exit__(self, *exc: object) -> None:
        _state.recomputing = self._previous
        with torch.no_grad():
            for b, value in self._saved:
                b.copy_(value)
        self._saved = []
