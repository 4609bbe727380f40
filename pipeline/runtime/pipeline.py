"""The pipeline runtime: every rank builds only its stages from a plan and runs a schedule over micro-batches.

Typical use, on every rank of an initialised process group (``torchrun``)::

    pipe = Pipeline(lambda: gpt("small"), plan=Plan.load("plan.json"),
                    optimizer_factory=lambda params: torch.optim.AdamW(params, lr=3e-4))
    for inputs, target in batches:
        loss = pipe.step(inputs, target)       # a tensor on the last rank, None elsewhere

[Note: building on meta]
The model factory runs under ``torch.device("meta")``, so the whole model costs no memory. The
model is traced on meta on every rank and cut where the plan says (cheap, and identical
everywhere, so every rank knows every stage's boundary tensors; nothing is costed or solved: see
[Note: one plan, made once] in `pipeline.runtime.layout`); each rank then allocates only its own stages and fills
them with the model's own values (`pipeline.runtime.weights`: the factory's model built once per
machine, a checkpoint read per tensor, or per-module init rules for models too big for host
memory). Stage modules share submodules with the meta model; ``to_empty`` gives every owning
module its own new tensor, so tied parameters are re-tied afterwards, and a parameter tied across
ranks is broadcast from one owner so that every copy starts equal.

[Note: step semantics]
`Pipeline.step` clears the gradients (unless the step before accumulated), runs the schedule
(parameter gradients accumulate over the micro-batches, scaled per [Note: loss scaling] in
`pipeline.runtime.stage`), reduces them over the replicas when there are several (started as
each stage's last backward ends; see `pipeline.parallel`), sums the gradients of parameters held
by several ranks (tied weights, over a subgroup of their ranks), clips by the global norm (see
[Note: the global norm] in `pipeline.runtime.clip`), then steps the optimizer and the LR
scheduler if given (`pipeline.runtime.update`). Before clipping, every rank learns whether the
step's loss or any gradient is not finite, and stops, drops the update or warns (see [Note:
non-finite steps] in `pipeline.runtime.finite`). Without an optimizer the gradients are left in
``.grad``. ``step(..., accumulate=True)`` only adds into ``.grad``; the next plain step reduces
and steps once (see [Note: one reduction per optimizer step] in `pipeline.parallel.accumulate`).
The loss comes back on the rank holding the last stage; other ranks get ``None``.

Errors on a rank say where they happened: see [Note: failing loudly] in
`pipeline.runtime.failure`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from partition.errors import BatchError, PlanError
from partition.models.registry import BuiltModel, build_meta_model, target_free
from partition.modes.modal import bind_other_mode, stage_module
from partition.plan import Plan
from partition.schedules.actions import Kind, with_communication
from partition.schedules.check import check_channel_order
from partition.schedules.simulate import TimelineEvent
from pipeline.parallel.accumulate import GradientSync
from pipeline.parallel.fsdp import shard_replicas
from pipeline.parallel.mesh import replicas
from pipeline.parallel.reduce import broadcast_from_first
from pipeline.runtime.batch import BatchSplit, gather_outputs, reduce_losses, split_batch
from pipeline.runtime.batchnorm import defer_batchnorm
from pipeline.runtime.device import stage_device
from pipeline.runtime.executor import RankExecutor
from pipeline.runtime.failure import RankLog
from pipeline.runtime.layout import agree_on_layout, layout, recompute_of
from pipeline.runtime.optim import OptimizerFn, SchedulerFn, build_optimizer
from pipeline.runtime.options import PipelineOptions
from pipeline.runtime.stage import LossFn, StageExecutor
from pipeline.runtime.tied import TiedWeights
from pipeline.runtime.update import update
from pipeline.runtime.weights import allocate, describe_sources, fill, init_order

if TYPE_CHECKING:
    from pipeline.checkpoint.save_load import CheckpointInfo

__all__ = ["BatchError", "ModelFactory", "Pipeline", "PipelineOptions"]

log = logging.getLogger(__name__)

ModelFactory = Callable[[], Any]
"""Returns an ``nn.Module``, or ``(model, example_inputs, loss_fn)`` like `partition.models.examples`."""


class Pipeline:
    """One rank's part of a pipeline: its stages, their optimizer, and the schedule's actions."""

    def __init__(
        self,
        model_fn: ModelFactory,
        *,
        plan: Plan | None = None,
        options: PipelineOptions | None = None,
        loss_fn: LossFn | None = None,
        optimizer_factory: OptimizerFn | None = None,
        lr_scheduler_factory: SchedulerFn | None = None,
        group: dist.ProcessGroup | None = None,
        mesh: DeviceMesh | None = None,
    ) -> None:
        """Build this rank's stages; call on every rank of ``group`` (default: the world), or
        of ``mesh``.

        Args:
            model_fn: builds the model; called under ``torch.device("meta")``.
            plan: a plan from `partition.planning.model.plan_model` / ``pipepart plan``.
            options: see `PipelineOptions`.
            loss_fn: ``loss_fn(output, target)`` on the last stage (default: the factory's).
            optimizer_factory: ``optimizer_factory(params)`` for this rank's parameters.
            lr_scheduler_factory: ``lr_scheduler_factory(optimizer)``, stepped after each step.
            group: the pipeline's ranks (default: the world).
            mesh: a ``(dp, pp)`` ``DeviceMesh`` of replicas of the pipeline (instead of
                ``group``; or ``options.dp`` builds one over the world); see [Note: the (dp, pp)
                mesh] in `pipeline.parallel.mesh`.

        Raises:
            PlanError: the plan is for another world size or another model, the schedule cannot
                run these micro-batches, the options disagree with the plan, or the replicas
                with the world (`pipeline.parallel.mesh.replicas`).
        """
        self.options = options or PipelineOptions()
        self.replicas = replicas(mesh, group, self.options.dp)
        """Where this rank is on the mesh, and the groups: see `pipeline.parallel.mesh`."""
        self.group = self.replicas.pp_group
        self.plan = plan
        # What can fail is checked identically on every rank before the ranks compare layouts.
        built = self._check_inputs(model_fn, loss_fn, optimizer_factory, lr_scheduler_factory)
        self.device = stage_device(self.options.device, self.group)
        self._lay_out(built)
        agree_on_layout(self.stages, self.schedule, self.replicas.whole)  # in every replica
        self._materialize(built.model, model_fn)
        self._build_executors()
        self.sync = GradientSync(
            self._actions,
            self.executors,
            replicas=self.replicas,
            reduction=self.options.loss_reduction,
        )
        if self.replicas.dp > 1 and self.options.dp_reduce == "ddp":  # fsdp: shard_replicas
            tensors = [*self.parameters, *self.named_buffers().values()]
            broadcast_from_first(tensors, self.replicas.dp_group)
        self.optimizer, self.lr_scheduler = build_optimizer(
            self.parameters, optimizer_factory, lr_scheduler_factory
        )
        self.steps_done = 0
        self.timeline: list[TimelineEvent] = []
        """``(rank, action, start, end)`` of the last step, ``time.monotonic()`` seconds."""
        self.last_grad_norm: float | None = None
        """The global gradient norm of the last step (when clipping)."""
        self.nonfinite_steps: list[int] = []
        """Steps whose loss or gradients were not finite, dropped (``on_nonfinite="skip"``) or
        trained on (``"warn"``); see [Note: non-finite steps] in `pipeline.runtime.finite`."""
        self.log.info(
            "stages %s of %d, schedule %s, %d micro-batches, %d parameters",
            list(self.my_stages),
            len(self.stages),
            self.schedule.name,
            self.num_microbatches,
            sum(p.numel() for p in self.parameters),
        )

    # --- set-up, in order ---------------------------------------------------------------------

    def _check_inputs(
        self,
        model_fn: ModelFactory,
        loss_fn: LossFn | None,
        optimizer_factory: OptimizerFn | None,
        lr_scheduler_factory: SchedulerFn | None,
    ) -> BuiltModel:
        """This rank in its group, the model on meta (see [Note: building on meta]) and the
        loss function; raises `PlanError` for what cannot run."""
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.log = RankLog(log, self.rank)
        built = build_meta_model(model_fn, cpu_fallback=self.options.weights != "init")
        self.model_class = type(built.model).__name__  # for checkpoints
        found = loss_fn or built.loss_fn
        if found is None:
            raise PlanError(
                "the last stage needs a loss function: pass loss_fn= or return it from the model factory"
            )
        if lr_scheduler_factory is not None and optimizer_factory is None:
            raise PlanError("an LR scheduler needs an optimizer: pass optimizer_factory= too")
        if self.options.on_nonfinite == "skip" and optimizer_factory is None:
            raise PlanError(
                "on_nonfinite='skip' drops the optimizer's update, so it needs optimizer_factory=; "
                "with your own optimizer use 'warn' and check pipe.nonfinite_steps after a step"
            )
        self.loss_fn: LossFn = found
        return built

    def _lay_out(self, built: BuiltModel) -> None:
        """The stages and the schedule (`pipeline.runtime.layout`), this rank's share of them
        and its actions, checked."""
        laid_out = layout(built, self.plan, self.options, self.world_size, self.group)
        self.plan, self.stages, self.schedule = laid_out.plan, laid_out.stages, laid_out.schedule
        self.num_microbatches = self.schedule.num_microbatches
        self.input_specs = self.stages[0].inputs
        self.my_stages = self.schedule.stages_of(self.rank)
        with_comm = with_communication(self.schedule)
        check_channel_order(with_comm)
        self._actions = with_comm.actions[self.rank]
        self._eval_actions = tuple(
            a for a in self._actions if a.kind in (Kind.F, Kind.RECV_F, Kind.SEND_F)
        )
        self._batch = BatchSplit(
            specs=tuple(self.input_specs),
            microbatches=self.num_microbatches,
            rank=self.rank,
            first=0 in self.my_stages,
            last=self.is_last,
            device=self.device,
        )

    def _materialize(self, model: nn.Module, model_fn: ModelFactory) -> None:
        """Real weights for this rank's stages, tied weights made equal across ranks; see
        [Note: the model's own weights] in `pipeline.runtime.weights`."""
        self.tied = TiedWeights(self.stages, self.schedule, init_order(model), group=self.group)
        allocated, retie = allocate(
            [self.stages[s].module for s in self.my_stages], model, self.device
        )
        fill(  # every replica's ranks: the factory's model built once per machine
            allocated,
            model_fn=model_fn,
            meta_model=model,
            options=self.options,
            group=self.replicas.whole,
        )
        self.weight_sources = dict(allocated.sources)
        """Tensor name -> where its value came from: ``factory``, ``checkpoint`` or ``init``."""
        self.log.info("weights of stages %s: %s", list(self.my_stages), describe_sources(allocated))
        self._named = shard_replicas(self, retie())  # dp_reduce="fsdp": pipeline.parallel.fsdp
        self.tied.bind(self._named)
        self.norm_params = self.tied.norm_params(self._named)
        """This rank's share of the global norm (`TiedWeights.norm_params`)."""
        self.param_names = {id(p): n for n, p in reversed(self._named.items())}
        """A parameter's first name, by ``id``."""

    def _build_executors(self) -> None:
        """A `StageExecutor` per stage of this rank and the `RankExecutor` that runs them (a
        collective when it makes a communicator per link)."""
        options = self.options
        mine = [self.stages[s].module for s in self.my_stages]
        for s in self.my_stages:  # see partition.modes.modal and pipeline.runtime.batchnorm
            if options.batchnorm == "batch":
                defer_batchnorm(self.stages[s].module, self.num_microbatches)
            bind_other_mode(self.stages[s], mine)
        scale = 1.0 / self.num_microbatches if options.loss_reduction == "mean" else 1.0
        self.executors = {
            s: StageExecutor(
                self.stages[s],
                loss_fn=self.loss_fn,
                loss_scale=scale,
                recompute=recompute_of(self.plan, options),
                autocast=options.autocast,
                device=self.device,
            )
            for s in self.my_stages
        }
        self.parameters = list(
            {id(p): p for e in self.executors.values() for p in e.parameters}.values()
        )
        """This rank's trainable parameters, each once."""
        self.rank_executor = RankExecutor(
            self.stages,
            self.schedule,
            self.executors,
            rank=self.rank,
            device=self.device,
            group=self.group,
            check_boundaries=options.check_boundaries,
            link_groups=options.link_groups,
        )

    # --- public API ---------------------------------------------------------------------------

    @property
    def is_last(self) -> bool:
        """Whether this rank holds the last stage (and gets the loss)."""
        return len(self.stages) - 1 in self.my_stages

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """This rank's parameters by every qualified name they have in the whole model."""
        return dict(self._named)

    def named_buffers(self) -> dict[str, Tensor]:
        """This rank's buffers (persistent or not) by every qualified name they have."""
        out: dict[str, Tensor] = {}
        for s in self.my_stages:
            out.update(self.stages[s].module.named_buffers(remove_duplicate=False))
        return out

    def state_dict(self) -> dict[str, Tensor]:
        """This rank's stages' parameters and buffers, keyed as in the whole model's ``state_dict``."""
        out: dict[str, Tensor] = {}
        for s in self.my_stages:
            out.update(self.stages[s].module.state_dict())
        return out

    def save(self, root: str | Path, **kwargs: Any) -> Path:
        """Save a checkpoint under ``root`` (a collective); see `pipeline.checkpoint.save_load.save_checkpoint`."""
        from pipeline.checkpoint.save_load import save_checkpoint

        return save_checkpoint(self, root, **kwargs)

    def load(self, path: str | Path) -> CheckpointInfo:
        """Restore a checkpoint (a collective); see `pipeline.checkpoint.save_load.load_checkpoint`."""
        from pipeline.checkpoint.save_load import load_checkpoint

        return load_checkpoint(self, path)

    def train(self, mode: bool = True) -> Pipeline:
        """Put this rank's stages in training (or, with ``False``, evaluation) mode: each runs
        its graph for that mode (see `partition.modes.modal`) with its modules in that mode."""
        for s, e in self.executors.items():
            e.module = stage_module(self.stages[s], mode)
            e.module.train(mode)
        return self

    @property
    def dp(self) -> int:
        """How many replicas of the pipeline train together (1 without a mesh)."""
        return self.replicas.dp

    @property
    def replica(self) -> int:
        """This rank's replica, ``0 .. dp - 1``: which shard of the data it reads."""
        return self.replicas.replica

    def zero_grad(self) -> None:
        """Drop this rank's gradients, accumulated ones included (`step` does it first, unless
        the step before accumulated)."""
        self.sync.clear()  # the count, and under fsdp the gathered gradients
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        for p in self.parameters:
            p.grad = None

    def step(
        self, inputs: Any = None, target: Any = None, *, accumulate: bool = False
    ) -> Tensor | None:
        """One training step over a full batch; see [Note: step semantics].

        Args:
            inputs: the model's inputs for the whole batch (a tensor or a tuple), needed on the
                rank of stage 0; passing it on every rank is fine (and checks it everywhere).
                With replicas, this replica's shard (`pipeline.parallel.data.shard`).
            target: the loss function's target for the whole batch, needed on the last rank.
            accumulate: add into the gradients only: no reduction over replicas, no optimizer
                step; the next plain step does both, once, for every step since the last.

        Returns:
            On the last stage's rank, the batch loss (detached): the mean of the micro-batch
            losses, or their sum with ``loss_reduction="sum"``; with replicas, this replica's
            (`pipeline.parallel.data.global_loss` combines them). ``None`` elsewhere.

        Raises:
            BatchError: before any message, if the batch does not split into the plan's
                micro-batches.
            StageError: an action failed; also an instance of the original exception's type.
            NonFiniteError: the loss or a gradient is not finite (``on_nonfinite="stop"``), on
                every rank, before the optimizer steps.
        """
        mb_inputs, mb_targets = split_batch(
            inputs, target, self._batch, need_target=not target_free(self.loss_fn)
        )
        if self.sync.accumulated == 0:
            self.zero_grad()
        _, self.timeline = self.rank_executor.run(
            self._actions,
            mb_inputs,
            mb_targets,
            train=True,
            step=self.steps_done,
            after=self.sync.hooks(accumulate),
        )
        update(self, accumulate=accumulate)
        self.steps_done += 1
        if not self.is_last:
            return None
        losses = self.executors[len(self.stages) - 1].losses
        return reduce_losses(losses, self.options.loss_reduction)

    def evaluate(self, inputs: Any = None, target: Any = None) -> Any:
        """Forward only, no autograd: on the last rank the loss if ``target`` is given, else the
        model's output for the whole batch (micro-batch outputs concatenated); ``None`` elsewhere.

        Stages keep their mode: call ``train(False)`` first for the model's eval behaviour
        (dropout off, BatchNorm on its running statistics), as with ``model.eval()``.
        """
        mb_inputs, mb_targets = split_batch(inputs, target, self._batch, need_target=False)
        outputs, self.timeline = self.rank_executor.run(
            self._eval_actions, mb_inputs, mb_targets, train=False, step=self.steps_done
        )
        if not self.is_last:
            return None
        parts = [outputs[i] for i in range(self.num_microbatches)]
        if target is not None:
            return reduce_losses(parts, self.options.loss_reduction)
        return gather_outputs(parts)
