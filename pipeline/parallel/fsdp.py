"""Sharded replicas (``dp_reduce="fsdp"``): each stage wrapped by FSDP2's ``fully_shard`` over the
dp dimension of the mesh, so that its parameters, gradients and optimizer state are split over
the replicas, and its gradients reduce-scattered once per optimizer step.

[Note: FSDP under a pipeline]
Each of a rank's stage modules is one ``fully_shard`` unit over ``mesh["dp"]`` (the ranks holding
that stage in every replica), applied once the weights are filled, tied and equal across
replicas, before the executors and the optimizer see the parameters: they see the sharded
``DTensor`` ones, so the optimizer's state is sharded too. ``reshard_after_forward=False``, as
torchtitan chooses under a pipeline: a stage runs ``m`` forwards before (or among) its ``m``
backwards, and resharding after each would all-gather the weights ``2m`` times a step; kept
gathered, they are all-gathered once, at the step's first forward, and freed when the gradients
are reduced. So a device holds its stage's whole weights and gradients during the step (what
`partition.memory.replicated_memory` predicts), and only shards between steps.

FSDP reduces from autograd hooks, once per ``backward()``; a stage runs many backward calls a
step, and under a split backward (ZB-H1) its W is ``torch.autograd.grad`` on gradient edges,
which FSDP's hooks never see. So its automatic reduction is switched off
(``set_requires_gradient_sync(False)``: the gathered gradients accumulate over the micro-batches
in the gathered parameters' ``.grad``, where W adds too, since `pipeline.runtime.stage` takes the
weights W differentiates from the module as it is then), and the reduction is driven from the
schedule, exactly as for ``ddp`` (see [Note: reducing over replicas] in
`pipeline.parallel.reduce`): after a stage's last B or W of an optimizer step (never on an
``accumulate=True`` step) its unit's post-backward runs with the sync on, reduce-scattering the
gradients, divided by the step's factor (`pipeline.parallel.accumulate`: ``K * D`` for a mean
loss, 1 for a sum) with a plain sum and a division afterwards, which every backend has
(``set_force_sum_reduction_for_comms``: FSDP would otherwise divide by a factor other than ``D``
with ``PREMUL_SUM``, which gloo refuses), and resharding the weights. After the schedule the
root's final callback waits for every reduce-scatter; FSDP's collectives are
``all_gather_single`` and ``reduce_scatter_single``, which gloo runs on the CPU. This is what
``torch.distributed.pipelining`` does in its ``REDUCE_GRAD`` action, once per stage as soon as the
stage is done rather than in one bulk at the end. ``zero_grad`` in the middle of an
accumulation drops the gathered gradients too (`ShardedGrads.clear`).

After that the optimizer sees sharded gradients: the non-finite check and the global norm read
each rank's own shards (`shard_of`), and the norm sums over the whole mesh, not one replica's
pipeline (`norm_group`); a weight tied across the stage-ranks of a replica is sharded alike on
each of them (the same parameter), so its shards' gradients sum over the same subgroup as
whole ones do (`pipeline.runtime.tied`).

What cannot run sharded is refused when the pipeline is built: a stage traced in two modes (its
other mode's graph would read the sharded weights outside FSDP; trace the training mode only), a
parameter shared by two stages of one rank (one FSDP unit per stage). Checkpoints gather the
shards whole and write what replicated replicas write (see [Note: checkpoints of sharded
replicas] in `pipeline.checkpoint.sharded`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from partition.errors import PlanError
from pipeline.parallel.mesh import Replicas
from pipeline.parallel.reduce import broadcast_from_first

if TYPE_CHECKING:
    import torch.distributed as dist

    from partition.split import Stage
    from pipeline.runtime.stage import StageExecutor

_FSDP = r"torch\.distributed\.fsdp\."
"""Where FSDP's warnings come from."""

__all__ = [
    "ShardedGrads",
    "full",
    "is_sharded",
    "norm_group",
    "shard_of",
    "shard_replicas",
]


class _Options(Protocol):
    """What is read of `pipeline.runtime.options.PipelineOptions` (not imported: the runtime's
    non-finite check and clipping import this module)."""

    @property
    def dp_reduce(self) -> str: ...


class _Building(Protocol):
    """What `shard_replicas` reads of a pipeline being built."""

    @property
    def options(self) -> _Options: ...
    @property
    def replicas(self) -> Replicas: ...
    @property
    def stages(self) -> Sequence[Stage]: ...
    @property
    def my_stages(self) -> Sequence[int]: ...


def is_sharded(options: _Options, replicas: Replicas) -> bool:
    """Whether the stages are sharded over the replicas: ``dp_reduce="fsdp"`` with ``dp > 1``."""
    return options.dp_reduce == "fsdp" and replicas.dp > 1


def shard_replicas(pipe: _Building, named: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    """Under ``dp_reduce="fsdp"``, give every replica the first one's weights and buffers, then
    shard each of this rank's stages over the replicas (a collective of the dp group); see
    [Note: FSDP under a pipeline]. Returns this rank's parameters by every name they have: the
    sharded ones, or ``named`` itself when nothing is sharded.

    Raises:
        PlanError: a stage has a second mode's graph, or a parameter is in two of this rank's
            stages.
    """
    if not is_sharded(pipe.options, pipe.replicas):
        return named
    mesh = pipe.replicas.mesh
    assert mesh is not None
    stages = [pipe.stages[s] for s in pipe.my_stages]
    _check_shardable(stages)
    modules = [stage.module for stage in stages]
    buffers = [b for m in modules for b in m.buffers()]
    broadcast_from_first([*_unique(named.values()), *buffers], pipe.replicas.dp_group)
    # [Note: FSDP under a pipeline]: the weights stay gathered and the executor never changes a
    # stage's outputs in place, so a view among them loses nothing FSDP's warning is about.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPStage", module=_FSDP)
    sharded: dict[str, nn.Parameter] = {}
    for module in modules:
        fully_shard(module, mesh=mesh["dp"], reshard_after_forward=False)
        assert isinstance(module, FSDPModule)
        module.set_force_sum_reduction_for_comms(True)
        _sync(module, False)
        sharded.update(module.named_parameters(remove_duplicate=False))
    if set(sharded) != set(named):  # every name the pipeline knows, and no other
        raise PlanError(
            f"sharding renamed parameters: {sorted(set(named) ^ set(sharded))[:4]}; "
            "use dp_reduce='ddp'"
        )
    return sharded


def _check_shardable(stages: Sequence[Stage]) -> None:
    from partition.modes.modal import ModalStage

    for stage in stages:
        if isinstance(stage, ModalStage) and stage.other is not None:
            raise PlanError(
                f"stage {stage.index} was traced in both training and eval mode, and its "
                "eval-mode graph cannot run on weights that dp_reduce='fsdp' shards; trace the "
                "training mode only (PipelineOptions(modes='train'), --modes train), or use "
                "dp_reduce='ddp'"
            )
    seen: dict[int, int] = {}
    for stage in stages:
        for p in stage.module.parameters():
            first = seen.setdefault(id(p), stage.index)
            if first != stage.index:
                raise PlanError(
                    f"stages {first} and {stage.index} of one rank share a parameter (a tied "
                    "weight), and dp_reduce='fsdp' shards each stage on its own; place them on "
                    "different ranks (another --virtual or split), or use dp_reduce='ddp'"
                )


def _unique(params: Any) -> list[nn.Parameter]:
    return list({id(p): p for p in params}.values())


def _sync(module: FSDPModule, on: bool) -> None:
    """Whether the next backward reduce-scatters ``module``'s gradients and reshards its
    weights (on: the step's last), or accumulates them gathered (off)."""
    module.set_requires_gradient_sync(on)
    module.set_reshard_after_backward(on)
    module.set_is_last_backward(on)


class ShardedGrads:
    """The reduce-scatter of each stage's gradients at its ready point (the same interface as
    `pipeline.parallel.reduce.GradReducer`); see [Note: FSDP under a pipeline]."""

    def __init__(
        self, ready: Sequence[Sequence[nn.Parameter]], executors: Sequence[StageExecutor]
    ) -> None:
        """
        Args:
            ready: for each ready point, in the order the schedule reaches them, the parameters
                whose gradients are complete there (`pipeline.parallel.accumulate.ready_points`).
            executors: this rank's stages, each one FSDP unit.
        """
        units = [(e.module, {id(p) for p in e.parameters}) for e in executors]
        self._points: list[list[FSDPModule]] = []
        for params in ready:
            ids = {id(p) for p in params}
            here = [m for m, own in units if own & ids]
            assert all(isinstance(m, FSDPModule) for m in here), "a stage is not sharded"
            self._points.append(here)  # type: ignore[arg-type]
        self._started = [False] * len(self._points)

    def start(self, point: int, scale: float) -> None:
        """Reduce-scatter the gradients of ready point ``point``'s stages, times ``scale``."""
        factor = 1.0 / scale
        if abs(factor - round(factor)) < 1e-9:  # K * D or 1: divide exactly by the integer
            factor = float(round(factor))
        for module in self._points[point]:
            module.set_gradient_divide_factor(factor)
            _sync(module, True)
            state = fully_shard.state(module)  # type: ignore[attr-defined]
            for each in state._state_ctx.all_states:
                for group in each._fsdp_param_groups:
                    group.post_backward()
        self._started[point] = True

    def finish(self, scale: float) -> None:
        """Start what the schedule did not, wait for every reduce-scatter, and switch the
        automatic reduction off again for the next step."""
        for point, started in enumerate(self._started):
            if not started:
                self.start(point, scale)
        for modules in self._points:
            for module in modules:
                fully_shard.state(module)._root_post_backward_final_callback()  # type: ignore[attr-defined]
                _sync(module, False)
        self._started = [False] * len(self._points)

    def clear(self) -> None:
        """Drop the gradients accumulated on the gathered weights (``zero_grad`` in the middle
        of an accumulation): while gathered, a unit's registered parameters are those."""
        for modules in self._points:
            for module in modules:
                for p in module.parameters():  # type: ignore[attr-defined]
                    p.grad = None


def shard_of(t: Tensor) -> Tensor:
    """This rank's shard of ``t`` (a ``DTensor``), or ``t`` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t: Tensor) -> Tensor:
    """The whole of ``t``, gathered from every shard when it is a ``DTensor`` (a collective of
    its mesh), else ``t`` itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def norm_group(
    options: _Options, replicas: Replicas, pp_group: dist.ProcessGroup | None
) -> dist.ProcessGroup | None:
    """The ranks whose gradients make up the global norm: one replica's pipeline when every
    replica holds the same whole gradients, the whole mesh when each holds a shard."""
    return replicas.whole if is_sharded(options, replicas) else pp_group
