"""What a training step does after its schedule, in order: the gradients reduced over replicas
and summed over tied copies, the non-finite verdict, clipping, the optimizer; see [Note: step
semantics] in `pipeline.runtime.pipeline`.

Which group each spans, with replicas (see [Note: the (dp, pp) mesh] in `pipeline.parallel.mesh`):
the reduction runs over the dp group (the same stages in every replica) first, so that a tied
weight's copies then sum, over the ranks of one replica's pipeline, gradients that already hold
every replica's share; after that every replica holds the same gradients, so the global norm is
the pipeline's (over the pp group: counting each replica would count every gradient ``dp``
times; under ``dp_reduce="fsdp"`` each holds a shard, and the norm spans the whole mesh, see
`pipeline.parallel.fsdp`); the non-finite verdict spans the whole mesh, so that every replica drops or takes the
same update.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from partition.errors import StageError
from pipeline.parallel.accumulate import GradientSync
from pipeline.parallel.fsdp import norm_group
from pipeline.parallel.mesh import Replicas
from pipeline.runtime.clip import clip_grad_norm
from pipeline.runtime.failure import locate
from pipeline.runtime.finite import decide, find_nonfinite
from pipeline.runtime.options import PipelineOptions
from pipeline.runtime.stage import StageExecutor
from pipeline.runtime.tied import TiedWeights

__all__ = ["Stepped", "update"]


class Stepped(Protocol):
    """What `update` reads of a pipeline (a `pipeline.runtime.pipeline.Pipeline` is one), and
    ``last_grad_norm`` and ``nonfinite_steps``, which it writes."""

    last_grad_norm: float | None

    @property
    def rank(self) -> int: ...
    @property
    def steps_done(self) -> int: ...
    @property
    def options(self) -> PipelineOptions: ...
    @property
    def group(self) -> dist.ProcessGroup | None: ...
    @property
    def replicas(self) -> Replicas: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def executors(self) -> dict[int, StageExecutor]: ...
    @property
    def parameters(self) -> list[nn.Parameter]: ...
    @property
    def norm_params(self) -> list[nn.Parameter]: ...
    @property
    def param_names(self) -> dict[int, str]: ...
    @property
    def nonfinite_steps(self) -> list[int]: ...
    @property
    def sync(self) -> GradientSync: ...
    @property
    def tied(self) -> TiedWeights: ...
    @property
    def optimizer(self) -> torch.optim.Optimizer | None: ...
    @property
    def lr_scheduler(self) -> Any: ...
    def zero_grad(self) -> None: ...


def update(pipe: Stepped, *, accumulate: bool) -> None:
    """Finish ``pipe``'s step after its schedule (a collective): only count it when it
    ``accumulate``\\ s, else reduce, check, clip and step. Errors are placed ``[rank r · step k ·
    what]`` (see [Note: failing loudly] in `pipeline.runtime.failure`)."""
    _placed(pipe, "gradients", lambda: pipe.sync.finish(accumulate))
    if accumulate:
        return
    _placed(pipe, "gradients", pipe.tied.reduce_grads)
    if _placed(pipe, "non-finite check", lambda: _finite(pipe)):
        _placed(pipe, "gradients", lambda: _clip(pipe))
        if pipe.optimizer is not None:
            _placed(pipe, "optimizer", lambda: _optimizer_step(pipe))


def _placed(pipe: Stepped, what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except StageError:
        raise
    except Exception as e:
        raise locate(e, pipe.rank, pipe.steps_done, what=what) from e


def _finite(pipe: Stepped) -> bool:
    """Whether the step may update (a collective over every replica); see [Note: non-finite
    steps] in `pipeline.runtime.finite`."""
    found = find_nonfinite(
        pipe.executors, pipe.param_names, group=pipe.replicas.whole, device=pipe.device
    )
    if found is not None:
        pipe.nonfinite_steps.append(pipe.steps_done)
    if decide(found, pipe.options.on_nonfinite, rank=pipe.rank, step=pipe.steps_done):
        return True
    pipe.zero_grad()
    return False


def _clip(pipe: Stepped) -> None:
    if pipe.options.max_grad_norm is not None:
        pipe.last_grad_norm = clip_grad_norm(
            pipe.parameters,
            pipe.options.max_grad_norm,
            counted=pipe.norm_params,
            group=norm_group(pipe.options, pipe.replicas, pipe.group),  # fsdp: every shard
            device=pipe.device,
        )


def _optimizer_step(pipe: Stepped) -> None:
    assert pipe.optimizer is not None
    pipe.optimizer.step()
    if pipe.lr_scheduler is not None:
        pipe.lr_scheduler.step()
