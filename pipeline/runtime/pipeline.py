"""The pipeline runtime: every rank builds only its stages from a plan and runs a schedule over micro-batches.

Typical use, on every rank of an initialised process group (``torchrun``)::

    pipe = Pipeline(lambda: gpt("small"), plan=Plan.load("plan.json"),
                    optimizer_factory=lambda params: torch.optim.AdamW(params, lr=3e-4))
    for inputs, target in batches:
        loss = pipe.step(inputs, target)       # a tensor on the last rank, None elsewhere

[Note: building on meta]
The model factory runs under ``torch.device("meta")``, so the whole model costs no memory. The
model is traced and split on meta on every rank (cheap, and identical everywhere, so every rank
knows every stage's boundary tensors); each rank then allocates only its own stages and fills
them with the model's own values (`pipeline.runtime.weights`: the factory's model built once per
machine, a checkpoint read per tensor, or per-module init rules for models too big for host
memory). Stage modules share submodules with the meta model; ``to_empty`` gives every owning
module its own new tensor, so tied parameters are re-tied afterwards, and a parameter tied across
ranks is broadcast from one owner so that every copy starts equal.

[Note: step semantics]
`Pipeline.step` clears the gradients, runs the schedule (parameter gradients accumulate over the
micro-batches, scaled per [Note: loss scaling] in `pipeline.runtime.stage`), sums the gradients of
parameters held by several ranks (tied weights, over a subgroup of their ranks), clips by the
global norm (an all-reduce of squared norms, each parameter counted once), then steps the
optimizer and the LR scheduler if given. Without an optimizer the gradients are left in
``.grad``. The loss comes back on the rank holding the last stage; other ranks get ``None``.

[Note: failing loudly]
Every action runs under a handler that re-raises any exception with its place,
``[rank 2 · stage 2 · step 14 · 2B5]``, as an exception that is both a `StageError` and the
original type, chained to the original. A rank whose peer fails sees its next send or receive on
that peer fail at once (gloo closes the connection when a process exits) and raises a
`pipeline.runtime.comm.PeerError` naming the peer; a peer that hangs is caught by the process group's
timeout. Checks of the batch run before any message, identically on every rank given the batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from partition.errors import BatchError, PlanError, StageError, stage_error
from partition.models.registry import build_meta_model, target_free, unpack_model
from partition.modes.modal import bind_other_mode, stage_module
from partition.plan import Plan
from partition.schedules.actions import (
    Action,
    Kind,
    with_communication,
)
from partition.schedules.check import check_channel_order
from partition.schedules.simulate import TimelineEvent
from pipeline.runtime.batch import split_batch
from pipeline.runtime.batchnorm import defer_batchnorm
from pipeline.runtime.executor import RankExecutor
from pipeline.runtime.layout import agree_on_layout, layout
from pipeline.runtime.options import PipelineOptions
from pipeline.runtime.stage import LossFn, StageExecutor
from pipeline.runtime.tied import TiedWeights
from pipeline.runtime.weights import allocate, describe_sources, fill, init_order

if TYPE_CHECKING:
    from pipeline.checkpoint.save_load import CheckpointInfo

__all__ = [
    "BatchError",
    "ModelFactory",
    "Pipeline",
    "PipelineOptions",
]

log = logging.getLogger(__name__)

ModelFactory = Callable[[], Any]
"""Returns an ``nn.Module``, or ``(model, example_inputs, loss_fn)`` like `partition.models.examples`."""
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class _RankLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every message with ``[rank r]``."""

    def __init__(self, logger: logging.Logger, rank: int) -> None:
        super().__init__(logger, {})
        self.rank = rank

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[rank {self.rank}] {msg}", kwargs


class Pipeline:
    """One rank's part of a pipeline: its stages, their optimizer, and the schedule's actions."""

    def __init__(
        self,
        model_fn: ModelFactory,
        *,
        plan: Plan | None = None,
        options: PipelineOptions | None = None,
        loss_fn: LossFn | None = None,
        optimizer_factory: OptimizerFactory | None = None,
        lr_scheduler_factory: SchedulerFactory | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        """Build this rank's stages; call on every rank of ``group`` (default: the world).

        Args:
            model_fn: builds the model; called under ``torch.device("meta")``.
            plan: a plan from `partition.planning.model.plan_model` / ``pipepart plan``.
            options: see `PipelineOptions`.
            loss_fn: ``loss_fn(output, target)`` on the last stage (default: the factory's).
            optimizer_factory: ``optimizer_factory(params)`` for this rank's parameters.
            lr_scheduler_factory: ``lr_scheduler_factory(optimizer)``, stepped after each step.

        Raises:
            PlanError: the plan is for another world size or another model, the schedule cannot
                run these micro-batches, or the options disagree with the plan.
        """
        if not dist.is_initialized():
            raise PlanError(
                "torch.distributed is not initialised: call init_process_group first, "
                "or use pipeline.launch.run"
            )
        self.options = options = options or PipelineOptions()
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.log = _RankLog(log, self.rank)
        # Every check that can fail runs before the first collective, identically on every rank.
        built = build_meta_model(model_fn)
        self.plan, self.model_class = plan, type(built.model).__name__  # for checkpoints
        loss_fn = loss_fn or built.loss_fn
        if loss_fn is None:
            raise PlanError(
                "the last stage needs a loss function: pass loss_fn= or return it from the model factory"
            )
        if lr_scheduler_factory is not None and optimizer_factory is None:
            raise PlanError("an LR scheduler needs an optimizer: pass optimizer_factory= too")
        self.loss_fn = loss_fn
        self.stages, self.schedule = layout(built, plan, options, self.world_size)
        self.num_microbatches = self.schedule.num_microbatches
        self.input_specs = self.stages[0].inputs
        self.device = _device(options.device, group)
        self.my_stages = self.schedule.stages_of(self.rank)
        with_comm = with_communication(self.schedule)
        check_channel_order(with_comm)
        agree_on_layout(self.stages, self.schedule, group)  # the first collective
        self._actions = with_comm.actions[self.rank]
        self._eval_actions = tuple(
            a for a in self._actions if a.kind in (Kind.F, Kind.RECV_F, Kind.SEND_F)
        )

        self._materialize(built.model, model_fn)
        mine = [self.stages[s].module for s in self.my_stages]
        for s in self.my_stages:  # see partition.modes.modal and pipeline.runtime.batchnorm
            if options.batchnorm == "batch":
                defer_batchnorm(self.stages[s].module, self.num_microbatches)
            bind_other_mode(self.stages[s], mine)
        scale = 1.0 / self.num_microbatches if options.loss_reduction == "mean" else 1.0
        self.executors = {
            s: StageExecutor(
                self.stages[s],
                loss_fn=loss_fn,
                loss_scale=scale,
                recompute=options.recompute,
                autocast=options.autocast,
                device=self.device,
            )
            for s in self.my_stages
        }
        self.parameters = list(
            {id(p): p for e in self.executors.values() for p in e.parameters}.values()
        )
        """This rank's trainable parameters, each once."""
        self.runner = RankExecutor(
            self.stages,
            self.schedule,
            self.executors,
            rank=self.rank,
            device=self.device,
            group=group,
            check_boundaries=options.check_boundaries,
            link_groups=options.link_groups,
            global_rank=self._global,
            on_error=self._error,
        )
        self.transport = self.runner.transport
        self.optimizer = (
            # a stage of reshapes and activations has no parameters: nothing to step
            optimizer_factory(self.parameters)
            if optimizer_factory is not None and self.parameters
            else None
        )
        self.lr_scheduler = (
            lr_scheduler_factory(self.optimizer)
            if lr_scheduler_factory and self.optimizer
            else None
        )
        self.steps_done = 0
        self.timeline: list[TimelineEvent] = []
        """``(rank, action, start, end)`` of the last step, ``time.monotonic()`` seconds."""
        self.last_grad_norm: float | None = None
        """The global gradient norm of the last step (when clipping)."""
        self.log.info(
            "stages %s of %d, schedule %s, %d micro-batches, %d parameters",
            list(self.my_stages),
            len(self.stages),
            self.schedule.name,
            self.num_microbatches,
            sum(p.numel() for p in self.parameters),
        )

    # --- set-up ---------------------------------------------------------------------------

    def _global(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    def _subgroup(self, ranks: tuple[int, ...]) -> dist.ProcessGroup:
        """A process group over ``ranks`` (a collective: every rank calls it in the same order)."""
        if len(ranks) == self.world_size:
            return self.group or dist.group.WORLD  # type: ignore[return-value]
        group = dist.new_group([self._global(r) for r in ranks])
        assert group is not None
        return group

    def _materialize(self, model: nn.Module, model_fn: ModelFactory) -> None:
        """Real weights for this rank's stages, tied weights made equal across ranks; see
        [Note: the model's own weights] in `pipeline.runtime.weights`."""
        init_source = init_order(model)
        self.tied = TiedWeights(
            self.stages,
            self.schedule,
            init_source,
            rank=self.rank,
            subgroup=self._subgroup,
            global_rank=self._global,
        )
        allocated, retie = allocate(
            [self.stages[s].module for s in self.my_stages], model, self.device
        )
        options = self.options
        fill(
            allocated,
            model_fn=model_fn,
            meta_model=model,
            unpack=lambda built: unpack_model(built).model,
            mode=options.weights,
            seed=options.seed,
            checkpoint=options.checkpoint,
            factory_weights=options.factory_weights,
            group=self.group,
        )
        self.weight_sources = dict(allocated.sources)
        """Tensor name -> where its value came from: ``factory``, ``checkpoint`` or ``init``."""
        self.log.info("weights of stages %s: %s", list(self.my_stages), describe_sources(allocated))
        self._named = retie()
        self.tied.bind(self._named)
        self._norm_params = self.tied.norm_params(self._named)

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

    def zero_grad(self) -> None:
        """Drop this rank's gradients (`step` does it first)."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        for p in self.parameters:
            p.grad = None

    def step(self, inputs: Any = None, target: Any = None) -> Tensor | None:
        """One training step over a full batch; see [Note: step semantics].

        Args:
            inputs: the model's inputs for the whole batch (a tensor or a tuple), needed on the
                rank of stage 0; passing it on every rank is fine (and checks it everywhere).
            target: the loss function's target for the whole batch, needed on the last rank.

        Returns:
            On the last stage's rank, the batch loss (detached): the mean of the micro-batch
            losses, or their sum with ``loss_reduction="sum"``. ``None`` elsewhere.

        Raises:
            BatchError: before any message, if the batch does not split into the plan's
                micro-batches.
            StageError: an action failed; also an instance of the original exception's type.
        """
        mb_inputs, mb_targets = self._split_batch(
            inputs, target, need_target=not target_free(self.loss_fn)
        )
        self.zero_grad()
        _, self.timeline = self.runner.run(self._actions, mb_inputs, mb_targets, train=True)
        self._finish("gradients", self._reduce_grads)
        if self.optimizer is not None:
            self._finish("optimizer", self._optimizer_step)
        self.steps_done += 1
        return self._loss()

    def evaluate(self, inputs: Any = None, target: Any = None) -> Any:
        """Forward only, no autograd: on the last rank the loss if ``target`` is given, else the
        model's output for the whole batch (micro-batch outputs concatenated); ``None`` elsewhere.

        Stages keep their mode: call ``train(False)`` first for the model's eval behaviour
        (dropout off, BatchNorm on its running statistics), as with ``model.eval()``.
        """
        mb_inputs, mb_targets = self._split_batch(inputs, target, need_target=False)
        outputs, self.timeline = self.runner.run(
            self._eval_actions, mb_inputs, mb_targets, train=False
        )
        if not self.is_last:
            return None
        if target is not None:
            losses = torch.stack([outputs[i] for i in range(self.num_microbatches)])
            return losses.mean() if self.options.loss_reduction == "mean" else losses.sum()
        parts = [outputs[i] for i in range(self.num_microbatches)]
        return tree_map(
            lambda *xs: torch.cat(xs) if isinstance(xs[0], Tensor) else xs[0], parts[0], *parts[1:]
        )

    # --- after the schedule -----------------------------------------------------------------

    def _finish(self, what: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as e:
            raise self._error(e, None, what) from e

    def _reduce_grads(self) -> None:
        self.tied.reduce_grads()
        max_norm = self.options.max_grad_norm
        if max_norm is None:
            return
        grads = [p.grad.detach() for p in self._norm_params if p.grad is not None]
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        if grads:
            total += torch.stack([torch.linalg.vector_norm(g) for g in grads]).double().pow(2).sum()
        dist.all_reduce(total, group=self.group)
        norm = math.sqrt(float(total))
        self.last_grad_norm = norm
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            for p in self.parameters:
                if p.grad is not None:
                    p.grad.mul_(coef)

    def _optimizer_step(self) -> None:
        assert self.optimizer is not None
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()

    def _loss(self) -> Tensor | None:
        if not self.is_last:
            return None
        losses = self.executors[len(self.stages) - 1].losses
        total = torch.stack(losses).sum()
        return total / len(losses) if self.options.loss_reduction == "mean" else total

    def _error(self, error: Exception, action: Action | None, what: str = "") -> Exception:
        """``error`` with its place; see [Note: failing loudly]."""
        if isinstance(error, StageError):
            return error
        where = [f"rank {self.rank}"]
        if action is not None:
            where.append(f"stage {action.stage}")
        where.append(f"step {self.steps_done}")
        where.append(str(action) if action is not None else what)
        message = f"[{' · '.join(where)}] {type(error).__name__}: {error}"
        log.error("%s", message)  # already says which rank
        return stage_error(error, message)

    # --- the batch ---------------------------------------------------------------------------

    def _split_batch(
        self, inputs: Any, target: Any, *, need_target: bool
    ) -> tuple[list[Any] | None, list[Any] | None]:
        return split_batch(
            inputs,
            target,
            specs=self.input_specs,
            microbatches=self.num_microbatches,
            first=0 in self.my_stages,
            last=self.is_last,
            need_target=need_target,
            device=self.device,
            rank=self.rank,
        )


# --- helpers ---------------------------------------------------------------------------------


def _device(name: str | None, group: dist.ProcessGroup | None) -> torch.device:
    if name is not None:
        return torch.device(name)
    if dist.get_backend(group) == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
