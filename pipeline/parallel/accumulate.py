"""A step's gradients across steps and replicas: accumulation without an optimizer step, and one
scaled reduction per optimizer step.

[Note: one reduction per optimizer step]
``pipe.step(inputs, target, accumulate=True)`` runs the schedule and adds into ``.grad``: no
reduction over replicas, no optimizer step, and the next step does not clear the gradients. The
next plain ``step`` adds its own, reduces every gradient exactly once over the replicas (see
[Note: reducing over replicas] in `pipeline.parallel.reduce`) and steps. The gradient the
optimizer sees is then that of one process on the *global* batch: the ``K`` steps' batches of
all ``D`` replicas, concatenated. With ``loss_reduction="mean"`` each micro-batch's loss is
scaled by ``1/m`` during the backward ([Note: loss scaling] in `pipeline.runtime.stage`), and the
sum over ``K`` steps and ``D`` replicas by ``1/(K*D)`` as it is reduced: the mean over all
``K*D*m`` micro-batches, the global batch's mean loss when they are of equal size. With
``"sum"`` nothing is scaled: the sum over the global batch. ``K`` is known when the reduction
starts, so there is never a rescaling afterwards (``torch.distributed.pipelining`` rescales
every ``step``, which breaks accumulation over steps unless turned off: torchtitan#1733).
Without replicas (``D = 1``) the same holds with no collective: the accumulated gradients are
multiplied by ``1/K`` once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from partition.planning.replicas import ReduceWhen
from partition.schedules.actions import Action, Kind
from pipeline.parallel.fsdp import ShardedGrads
from pipeline.parallel.mesh import Replicas
from pipeline.parallel.reduce import GradReducer

if TYPE_CHECKING:
    from pipeline.runtime.stage import StageExecutor

__all__ = ["GradientSync", "ready_points"]


def ready_points(
    actions: Sequence[Action], executors: Mapping[int, StageExecutor]
) -> list[tuple[int, list[nn.Parameter]]]:
    """``(action index, parameters)`` for each point of ``actions`` after which some of this
    rank's parameters have their whole gradient: the last B or W of the stages holding them (a
    parameter in several of this rank's stages, at the latest of theirs), in action order."""
    last: dict[int, int] = {}
    for index, action in enumerate(actions):
        if action.kind in (Kind.B, Kind.W):
            last[action.stage] = index
    point: dict[int, tuple[int, nn.Parameter]] = {}
    for s, executor in sorted(executors.items()):
        if s not in last:
            continue
        for p in executor.parameters:
            if id(p) not in point or point[id(p)][0] < last[s]:
                point[id(p)] = (last[s], p)
    by_index: dict[int, list[nn.Parameter]] = {}
    for index, p in point.values():
        by_index.setdefault(index, []).append(p)
    return sorted(by_index.items(), key=lambda item: item[0])


class GradientSync:
    """When a step's gradients are cleared, reduced and scaled; see [Note: one reduction per
    optimizer step]."""

    def __init__(
        self,
        actions: Sequence[Action],
        executors: Mapping[int, StageExecutor],
        *,
        replicas: Replicas,
        reduction: Literal["mean", "sum"],
        when: ReduceWhen = "stage",
    ) -> None:
        """
        Args:
            actions: this rank's actions of a training step.
            executors: this rank's stages.
            replicas: where this rank is on the mesh (`pipeline.parallel.mesh.replicas`).
            reduction: the pipeline's ``loss_reduction``.
            when: start each ready point's reduction as its stage's last backward ends
                (``"stage"``), or every one after the schedule (``"end"``); see [Note:
                predicting the reduction over replicas] in `partition.planning.replicas`.
        """
        points = ready_points(actions, executors)
        self._point_at = {index: k for k, (index, _) in enumerate(points)}
        self._params = [p for _, params in points for p in params]
        ready = [params for _, params in points]
        self.reducer: GradReducer | ShardedGrads | None = None
        if replicas.dp > 1:  # dp_reduce "fsdp" made each stage an FSDP unit, "ddp" did not
            sharded = any(isinstance(e.module, FSDPModule) for e in executors.values())
            self.reducer = (
                ShardedGrads(ready, list(executors.values()))
                if sharded
                else GradReducer(ready, group=replicas.dp_group)
            )
        self.dp = replicas.dp
        self.reduction = reduction
        self.accumulated = 0
        """Steps added into ``.grad`` since the last optimizer step (``accumulate=True``)."""
        self.when: ReduceWhen = when
        """When the reduction starts (``pipe.sync.when = "end"`` to reduce in one bulk)."""

    def clear(self) -> None:
        """Forget what was accumulated since the last optimizer step (`Pipeline.zero_grad`):
        the count, and under fsdp the whole gradients its stages gathered so far."""
        self.accumulated = 0
        if isinstance(self.reducer, ShardedGrads):
            self.reducer.clear()

    @property
    def scale(self) -> float:
        """What the reduced gradients are multiplied by at the step that reduces now."""
        if self.reduction == "sum":
            return 1.0
        return 1.0 / ((self.accumulated + 1) * self.dp)

    def hooks(self, accumulate: bool) -> dict[int, Callable[[], None]]:
        """Action index -> what to start after it (a bucket's reduction), for this step."""
        if accumulate or self.reducer is None or self.when == "end":
            return {}  # finish() starts what was not started
        start, scale = self.reducer.start, self.scale
        return {index: functools.partial(start, k, scale) for index, k in self._point_at.items()}

    def finish(self, accumulate: bool) -> None:
        """After the schedule: count an accumulating step, or reduce (waiting for what the hooks
        started) and scale, once."""
        if accumulate:
            self.accumulated += 1
            return
        scale = self.scale
        if self.reducer is not None:
            self.reducer.finish(scale)
        elif scale != 1.0:
            with torch.no_grad():
                for p in self._params:
                    if p.grad is not None:
                        p.grad.mul_(scale)
        self.accumulated = 0
