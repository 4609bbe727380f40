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
them with the model's own values (`pipeline.weights`: the factory's model built once per
machine, a checkpoint read per tensor, or per-module init rules for models too big for host
memory). Stage modules share submodules with the meta model; ``to_empty`` gives every owning
module its own new tensor, so tied parameters are re-tied afterwards, and a parameter tied across
ranks is broadcast from one owner so that every copy starts equal.

[Note: step semantics]
`Pipeline.step` clears the gradients, runs the schedule (parameter gradients accumulate over the
micro-batches, scaled per [Note: loss scaling] in `pipeline.stage`), sums the gradients of
parameters held by several ranks (tied weights, over a subgroup of their ranks), clips by the
global norm (an all-reduce of squared norms, each parameter counted once), then steps the
optimizer and the LR scheduler if given. Without an optimizer the gradients are left in
``.grad``. The loss comes back on the rank holding the last stage; other ranks get ``None``.

[Note: failing loudly]
Every action runs under a handler that re-raises any exception with its place,
``[rank 2 · stage 2 · step 14 · 2B5]``, as an exception that is both a `StageError` and the
original type, chained to the original. A rank whose peer fails sees its next send or receive on
that peer fail at once (gloo closes the connection when a process exits) and raises a
`pipeline.comm.PeerError` naming the peer; a peer that hangs is caught by the process group's
timeout. Checks of the batch run before any message, identically on every rank given the batch.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from partition.errors import BatchError, PlanError, StageError
from partition.modes import bind_other_mode, stage_module
from partition.plan import Plan
from partition.registry import normalise, target_free
from partition.split import Stage, TensorSpec
from partition.trace import TraceMethod
from pipeline.batchnorm import defer_batchnorm
from pipeline.comm import BufferPool, Link, Transport, gradient_specs
from pipeline.schedules import (
    Action,
    Kind,
    Schedule,
    build_schedule,
    peak_inflight,
    validate,
    with_communication,
)
from pipeline.simulate import TimelineEvent
from pipeline.stage import LossFn, StageExecutor
from pipeline.weights import Materialized, WeightsMode, describe_sources, fill

__all__ = [
    "BatchError",
    "BuiltModel",
    "ModelFactory",
    "Pipeline",
    "PipelineOptions",
    "batch_size",
    "build_meta_model",
    "check_divisible",
    "unpack_model",
]

log = logging.getLogger(__name__)

ModelFactory = Callable[[], Any]
"""Returns an ``nn.Module``, or ``(model, example_inputs, loss_fn)`` like `partition.examples`."""
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class _RankLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every message with ``[rank r]``."""

    def __init__(self, logger: logging.Logger, rank: int) -> None:
        super().__init__(logger, {})
        self.rank = rank

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[rank {self.rank}] {msg}", kwargs


@dataclass(frozen=True, kw_only=True)
class PipelineOptions:
    """How to run a pipeline. Fields left ``None`` come from the plan."""

    schedule: str | None = None
    """``gpipe``, ``1f1b``, ``interleaved`` or ``zb-h1``; default the plan's, else ``1f1b``."""
    microbatches: int | None = None
    """Micro-batches per step; default the plan's (required without a plan)."""
    virtual: int | None = None
    """Stages per rank (``interleaved``); default the plan's, else 1."""
    bounds: tuple[int, ...] | None = None
    """Without a plan: the split, as node indices of the linear order (default: the partitioner's)."""
    loss_reduction: Literal["mean", "sum"] = "mean"
    """How micro-batch losses combine; see [Note: loss scaling] in `pipeline.stage`."""
    seed: int = 0
    """The factory builds the model after ``torch.manual_seed(seed)`` (and ``weights="init"``
    seeds its rules from it)."""
    weights: WeightsMode = "auto"
    """Where the values come from: ``factory`` (the model the factory builds, once per machine),
    ``init`` (the model's per-module init rules, for a model too big for host memory), ``auto``
    (``factory`` if the model fits in host memory); see [Note: the model's own weights] in
    `pipeline.weights`."""
    checkpoint: str | Path | None = None
    """A whole-model ``state_dict`` or safetensors file; each rank reads only its tensors. What it
    lacks (non-persistent buffers) comes from ``weights``."""
    factory_weights: str | Path | None = None
    """A file `pipeline.weights.save_tensors` wrote from the factory's model (the launcher passes
    it so that no rank builds the model again)."""
    recompute: bool = False
    """Recompute each stage's forward during its backward instead of keeping activations."""
    batchnorm: Literal["microbatch", "batch"] = "microbatch"
    """BatchNorm's running statistics in train mode: updated per micro-batch (what one process
    running the micro-batches one after another does), or once per step from the whole batch's
    statistics (each micro-batch is still normalised with its own); see `pipeline.batchnorm`."""
    autocast: torch.dtype | None = None
    """Run forward under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16``)."""
    max_grad_norm: float | None = None
    """Clip gradients to this global norm (across all stages) before the optimizer step."""
    check_boundaries: bool = True
    """Check each sent tensor's shape and dtype against the plan (one comparison per tensor)."""
    device: str | None = None
    """Where the stages live; default ``cuda:<local rank>`` under NCCL, else ``cpu``."""
    link_groups: bool | None = None
    """One communicator per link (default: on NCCL only); see [Note: one communicator per link]
    in `pipeline.comm`."""

    def __post_init__(self) -> None:
        if self.loss_reduction not in ("mean", "sum"):
            raise PlanError(f"loss_reduction must be 'mean' or 'sum', got {self.loss_reduction!r}")
        if self.microbatches is not None and self.microbatches < 1:
            raise PlanError(f"microbatches must be at least 1, got {self.microbatches}")
        if self.virtual is not None and self.virtual < 1:
            raise PlanError(f"virtual must be at least 1, got {self.virtual}")
        if self.batchnorm not in ("microbatch", "batch"):
            raise PlanError(f"batchnorm must be 'microbatch' or 'batch', got {self.batchnorm!r}")
        if self.weights not in ("auto", "factory", "init"):
            raise PlanError(f"weights must be 'auto', 'factory' or 'init', got {self.weights!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise PlanError(f"max_grad_norm must be positive, got {self.max_grad_norm}")


@dataclass(frozen=True)
class BuiltModel:
    """What a model factory gave: the model, example inputs, a loss function and a target."""

    model: nn.Module
    args: tuple[Any, ...] | None = None
    """Example positional inputs for the whole batch (None if the factory gave none)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Example keyword inputs."""
    loss_fn: LossFn | None = None
    target: Any = None


def unpack_model(built: Any) -> BuiltModel:
    """Normalise what a factory returned: a module, ``(model, inputs[, loss_fn[, target]])``, or a
    registry spec's ``(model, args, kwargs, loss_fn, target)``.

    Raises:
        InputError: anything else.
    """
    if isinstance(built, nn.Module):
        return BuiltModel(built)
    if isinstance(built, tuple) and len(built) == 5 and isinstance(built[0], nn.Module):
        model, args, kwargs, loss_fn, target = built  # a registry spec's build()
        return BuiltModel(model, tuple(args), dict(kwargs or {}), loss_fn, target)
    return BuiltModel(*normalise("the model factory", built))


def build_meta_model(model_fn: ModelFactory) -> BuiltModel:
    """Call ``model_fn`` under ``torch.device("meta")``; see [Note: building on meta]."""
    with torch.device("meta"):
        return unpack_model(model_fn())


def _init_order(model: nn.Module) -> dict[int, str]:
    """For each parameter, the name under which a whole-model initialisation writes it last."""
    last: dict[int, str] = {}
    for prefix, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False, remove_duplicate=False):
            last[id(p)] = f"{prefix}.{name}" if prefix else name
    return last


def _allocate(
    modules: Sequence[nn.Module], model: nn.Module, device: torch.device
) -> tuple[Materialized, Callable[[], dict[str, nn.Parameter]]]:
    """Allocate ``modules`` (parts of ``model``) on ``device``; see [Note: building on meta].

    Returns the allocation (to be filled, see `pipeline.weights`) and a function that re-ties
    what ``to_empty`` untied, returning the parameters by every name they have.
    """
    source = _init_order(model)
    places: dict[int, list[tuple[str, nn.Module, str]]] = collections.defaultdict(list)
    for part in modules:
        for prefix, module in part.named_modules(remove_duplicate=False):
            for name, p in module._parameters.items():
                if p is not None:
                    places[id(p)].append((f"{prefix}.{name}" if prefix else name, module, name))
    for part in modules:
        part.to_empty(device=device)

    def retie() -> dict[str, nn.Parameter]:
        named: dict[str, nn.Parameter] = {}
        for pid, where in places.items():
            chosen = next(
                (m._parameters[n] for q, m, n in where if q == source.get(pid)),
                where[0][1]._parameters[where[0][2]],
            )
            assert chosen is not None
            for qualified, module, name in where:
                module._parameters[name] = chosen
                named[qualified] = chosen
        return named

    return Materialized(modules), retie


@dataclass(frozen=True)
class _Shared:
    """A parameter held by stages on several ranks (a tied weight)."""

    names: tuple[str, ...]
    ranks: tuple[int, ...]
    source_rank: int
    """The rank whose value wins at initialisation; see [Note: building on meta]."""


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
            plan: a plan from `partition.planner.plan_model` / ``pipepart plan``.
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
                "or use pipeline.launch"
            )
        self.options = options = options or PipelineOptions()
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.log = _RankLog(log, self.rank)
        # Every check that can fail runs before the first collective, identically on every rank.
        built = build_meta_model(model_fn)
        loss_fn = loss_fn or built.loss_fn
        if loss_fn is None:
            raise PlanError(
                "the last stage needs a loss function: pass loss_fn= or return it from the model factory"
            )
        if lr_scheduler_factory is not None and optimizer_factory is None:
            raise PlanError("an LR scheduler needs an optimizer: pass optimizer_factory= too")
        self.loss_fn = loss_fn
        self.stages, self.schedule = _layout(built, plan, options, self.world_size)
        self.num_microbatches = self.schedule.num_microbatches
        self.input_specs = self.stages[0].inputs
        self.device = _device(options.device, group)
        self.my_stages = self.schedule.stages_of(self.rank)
        with_comm = with_communication(self.schedule)
        _check_channel_order(with_comm)
        self._actions = with_comm.actions[self.rank]
        self._eval_actions = tuple(
            a for a in self._actions if a.kind in (Kind.F, Kind.RECV_F, Kind.SEND_F)
        )

        self._materialize(built.model, model_fn)
        mine = [self.stages[s].module for s in self.my_stages]
        for s in self.my_stages:  # see partition.modes and pipeline.batchnorm
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
        self._links_setup()
        self.transport = Transport(
            self.rank,
            group=group,
            validate=options.check_boundaries,
            link_groups=self._link_groups(),
        )
        self._receives_train = self._receives(self._actions)
        self._receives_eval = self._receives(self._eval_actions)
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
        [Note: the model's own weights] in `pipeline.weights`."""
        init_source = _init_order(model)
        shared = _shared_params(self.stages, self.schedule, init_source)
        allocated, retie = _allocate(
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
        groups: dict[tuple[int, ...], dist.ProcessGroup] = {}
        self._shared: list[tuple[_Shared, dist.ProcessGroup, nn.Parameter | None]] = []
        for s in shared:  # a collective: every rank creates every subgroup, in the same order
            if s.ranks not in groups:
                groups[s.ranks] = self._subgroup(s.ranks)
            local = next((self._named[n] for n in s.names if n in self._named), None)
            self._shared.append((s, groups[s.ranks], local))
        with torch.no_grad():
            for s, sub, param in self._shared:
                if param is not None:
                    dist.broadcast(param.data, self._global(s.source_rank), group=sub)
        # A tied weight is counted in the global norm by the lowest of its ranks only.
        elsewhere = {
            id(p) for s, _, p in self._shared if p is not None and min(s.ranks) != self.rank
        }
        mine = {
            id(p): p for p in self._named.values() if p.requires_grad and id(p) not in elsewhere
        }
        self._norm_params = list(mine.values())

    def _link_groups(self) -> dict[tuple[str, int], dist.ProcessGroup] | None:
        """A two-rank group per link where the backend needs it; see [Note: one communicator
        per link] in `pipeline.comm`."""
        wanted = self.options.link_groups
        if wanted is None:
            wanted = dist.get_backend(self.group) != "gloo"
        if not wanted:
            return None
        rank_of = self.schedule.stage_to_rank
        groups = {}
        for cut in range(len(self.stages) - 1):  # a collective: every rank, every link, in order
            pair = tuple(sorted({rank_of(cut), rank_of(cut + 1)}))
            if len(pair) == 2:
                for direction in ("activation", "gradient"):
                    group = dist.new_group([self._global(r) for r in pair])
                    assert group is not None
                    groups[direction, cut] = group
        return groups

    def _links_setup(self) -> None:
        stages, schedule = self.stages, self.schedule
        rank_of = schedule.stage_to_rank
        self._act_out: dict[int, Link] = {}
        self._act_in: dict[int, Link] = {}
        self._grad_out: dict[int, Link] = {}
        self._grad_in: dict[int, Link] = {}
        self._pools: dict[tuple[str, int], BufferPool] = {}
        peak = peak_inflight(schedule)
        for s in range(len(stages) - 1):
            act = Link("activation", s, s + 1, rank_of(s), rank_of(s + 1), stages[s].outputs)
            grad = Link(
                "gradient",
                s + 1,
                s,
                rank_of(s + 1),
                rank_of(s),
                gradient_specs(stages[s + 1].inputs),
            )
            self._act_out[s], self._act_in[s + 1] = act, act
            self._grad_out[s + 1], self._grad_in[s] = grad, grad
            # + 1: the receive posted ahead (see [Note: receiving ahead] in pipeline.comm)
            if rank_of(s + 1) == self.rank and rank_of(s) != self.rank:
                self._pools["act", s + 1] = BufferPool(act.specs, self.device, peak[s + 1] + 1)
            if rank_of(s) == self.rank and rank_of(s + 1) != self.rank:
                self._pools["grad", s] = BufferPool(grad.specs, self.device, 2)
        self._remote = {s: rank_of(s) != self.rank for s in range(len(stages))}

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

    def train(self, mode: bool = True) -> Pipeline:
        """Put this rank's stages in training (or, with ``False``, evaluation) mode: each runs
        its graph for that mode (see `partition.modes`) with its modules in that mode."""
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
        self._run(self._actions, mb_inputs, mb_targets, train=True)
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
        outputs = self._run(self._eval_actions, mb_inputs, mb_targets, train=False)
        if not self.is_last:
            return None
        if target is not None:
            losses = torch.stack([outputs[i] for i in range(self.num_microbatches)])
            return losses.mean() if self.options.loss_reduction == "mean" else losses.sum()
        parts = [outputs[i] for i in range(self.num_microbatches)]
        return tree_map(
            lambda *xs: torch.cat(xs) if isinstance(xs[0], Tensor) else xs[0], parts[0], *parts[1:]
        )

    # --- the schedule ---------------------------------------------------------------------

    def _run(
        self,
        actions: Sequence[Action],
        mb_inputs: list[Any] | None,
        mb_targets: list[Any] | None,
        *,
        train: bool,
    ) -> dict[int, Any]:
        self._inbox: dict[tuple[str, int, int], list[Tensor]] = {}
        self._outbox: dict[tuple[str, int, int], list[Tensor]] = {}
        self._held: dict[tuple[int, int], list[tuple[BufferPool, list[Tensor]]]] = (
            collections.defaultdict(list)
        )
        self._results: dict[int, Any] = {}
        self._mb_inputs, self._mb_targets, self._train = mb_inputs, mb_targets, train
        for e in self.executors.values():
            e.reset()
        self.transport.expect(self._receives_train if train else self._receives_eval)
        events: list[TimelineEvent] = []
        clock = time.monotonic
        handlers = self._handlers
        grad_mode = torch.enable_grad() if train else torch.no_grad()
        with grad_mode:
            for action in actions:
                start = clock()
                try:
                    handlers[action.kind](action.stage, action.microbatch)
                except Exception as e:
                    raise self._error(e, action) from e
                events.append((self.rank, action, start, clock()))
        self._finish("flush", self.transport.flush)
        self.timeline = events
        self._inbox = self._outbox = {}
        self._held.clear()
        self._mb_inputs = self._mb_targets = None
        return self._results

    @property
    def _handlers(self) -> dict[Kind, Callable[[int, int], None]]:
        return {
            Kind.F: self._forward,
            Kind.B: self._backward,
            Kind.I: self._backward_input,
            Kind.W: self._backward_weight,
            Kind.SEND_F: self._send_forward,
            Kind.RECV_F: self._recv_forward,
            Kind.SEND_B: self._send_backward,
            Kind.RECV_B: self._recv_backward,
        }

    def _recv_forward(self, s: int, i: int) -> None:
        buffers = self.transport.recv(self._act_in[s], i)
        self._inbox["act", s, i] = buffers
        self._held[s, i].append((self._pools["act", s], buffers))

    def _recv_backward(self, s: int, i: int) -> None:
        buffers = self.transport.recv(self._grad_in[s], i)
        self._inbox["grad", s, i] = buffers
        self._held[s, i].append((self._pools["grad", s], buffers))

    def _receives(self, actions: Sequence[Action]) -> list[tuple[Link, BufferPool, list[int]]]:
        """Per incoming link, its pool and the micro-batches ``actions`` receive, in order."""
        order: dict[tuple[str, int], list[int]] = collections.defaultdict(list)
        for a in actions:
            if a.kind is Kind.RECV_F:
                order["act", a.stage].append(a.microbatch)
            elif a.kind is Kind.RECV_B:
                order["grad", a.stage].append(a.microbatch)
        links = {"act": self._act_in, "grad": self._grad_in}
        return [(links[kind][s], self._pools[kind, s], mbs) for (kind, s), mbs in order.items()]

    def _send_forward(self, s: int, i: int) -> None:
        self.transport.send(self._act_out[s], self._outbox.pop(("act", s, i)), i)

    def _send_backward(self, s: int, i: int) -> None:
        self.transport.send(self._grad_out[s], self._outbox.pop(("grad", s, i)), i)

    def _forward(self, s: int, i: int) -> None:
        executor = self.executors[s]
        if s == 0:
            assert self._mb_inputs is not None, "stage 0 needs the inputs: pass them to step()"
            inputs = self._mb_inputs[i]
        else:
            inputs = self._inbox.pop(("act", s, i))
        last = s == len(self.stages) - 1
        target = None
        if last and self._mb_targets is not None:
            target = self._mb_targets[i]
        if self._train:
            outputs = executor.forward(i, inputs, target)
        else:
            outputs = executor.evaluate(inputs, target)
            if last:
                self._results[i] = outputs
        if not last:
            self._hand_on("act", s, s + 1, i, outputs)
        if not self._train:
            self._release(s, i)

    def _hand_on(self, kind: str, s: int, to: int, i: int, tensors: list[Tensor]) -> None:
        if self._remote[to]:
            # A tensor passed straight through (a skip connection) may live in a receive buffer
            # that is recycled before the lazy send completes: send a copy of it instead.
            held = {
                b.untyped_storage().data_ptr()
                for _, bufs in self._held.get((s, i), ())
                for b in bufs
            }
            if held:
                tensors = [
                    t.clone() if t.untyped_storage().data_ptr() in held else t for t in tensors
                ]
            self._outbox[kind, s, i] = tensors
        else:  # the neighbour is on this rank (a one-rank pipeline): no message
            link = self._act_out[s] if kind == "act" else self._grad_out[s]
            if self.options.check_boundaries:
                link.check(tensors, i)
            self._inbox[kind, to, i] = tensors

    def _grads_for(self, s: int, i: int) -> list[Tensor] | None:
        return None if s == len(self.stages) - 1 else self._inbox.pop(("grad", s, i))

    def _backward(self, s: int, i: int) -> None:
        grads = self.executors[s].backward(i, self._grads_for(s, i))
        self._release(s, i)
        if s > 0:
            self._hand_on("grad", s, s - 1, i, grads)

    def _backward_input(self, s: int, i: int) -> None:
        grads = self.executors[s].backward_input(i, self._grads_for(s, i))
        if s > 0:
            self._hand_on("grad", s, s - 1, i, grads)

    def _backward_weight(self, s: int, i: int) -> None:
        self.executors[s].backward_weight(i)
        self._release(s, i)

    def _release(self, s: int, i: int) -> None:
        for pool, buffers in self._held.pop((s, i), ()):
            pool.release(buffers)

    # --- after the schedule -----------------------------------------------------------------

    def _finish(self, what: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as e:
            raise self._error(e, None, what) from e

    def _reduce_grads(self) -> None:
        for _, sub, p in self._shared:
            if p is None:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=sub)
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
        return _stage_error(error, message)

    # --- the batch ---------------------------------------------------------------------------

    def _split_batch(
        self, inputs: Any, target: Any, *, need_target: bool
    ) -> tuple[list[Any] | None, list[Any] | None]:
        m = self.num_microbatches
        if isinstance(inputs, Tensor):
            inputs = (inputs,)
        elif isinstance(inputs, dict):
            missing = [s.name for s in self.input_specs if s.name not in inputs]
            if missing:
                raise BatchError(
                    f"the inputs lack {missing}; the model's inputs are {[s.name for s in self.input_specs]}"
                )
            inputs = tuple(inputs[s.name] for s in self.input_specs)
        if inputs is None and 0 in self.my_stages:
            raise BatchError(
                f"rank {self.rank} holds stage 0 and needs the inputs; pass them to step()"
            )
        if target is None and need_target and self.is_last:
            raise BatchError(
                f"rank {self.rank} holds the last stage and needs the target; pass it to step()"
            )
        sizes = []
        if inputs is not None:
            inputs = tuple(inputs)
            if len(inputs) != len(self.input_specs):
                raise BatchError(
                    f"the model takes {len(self.input_specs)} input tensor(s) "
                    f"({', '.join(s.describe() for s in self.input_specs)}), got {len(inputs)}"
                )
            sizes += [
                (f"input {s.name!r}", batch_size(t))
                for s, t in zip(self.input_specs, inputs, strict=True)
            ]
        if target is not None:
            sizes += [("target", batch_size(t)) for t in _tensors(target)]
        batches = {b for _, b in sizes}
        if len(batches) > 1:
            raise BatchError(
                f"inputs and target disagree on the batch size (dimension 0): {', '.join(f'{n} {b}' for n, b in sizes)}"
            )
        if batches:
            check_divisible(batches.pop(), m)
        mb_inputs = None
        if inputs is not None:
            for spec, t in zip(self.input_specs, inputs, strict=True):
                _check_spec(spec, t, m)
            if 0 in self.my_stages:
                chunks = [t.to(self.device).tensor_split(m) for t in inputs]
                mb_inputs = [[c[i] for c in chunks] for i in range(m)]
        mb_targets = None
        if target is not None and self.is_last:
            mb_targets = [_chunk(target, m, i, self.device) for i in range(m)]
        return mb_inputs, mb_targets


# --- helpers ---------------------------------------------------------------------------------


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _chunk(value: Any, m: int, i: int, device: torch.device) -> Any:
    """Micro-batch ``i`` of ``m`` of a tensor or a (nested) tuple, list or dict of tensors."""
    if isinstance(value, Tensor):
        return value.to(device).tensor_split(m)[i]
    if isinstance(value, (tuple, list)):
        return type(value)(_chunk(v, m, i, device) for v in value)
    if isinstance(value, dict):
        return {k: _chunk(v, m, i, device) for k, v in value.items()}
    return value


def batch_size(t: Any) -> int:
    if not isinstance(t, Tensor) or t.dim() == 0:
        raise BatchError(
            f"every input and target must be a tensor with a batch dimension, got {type(t).__name__}{'' if not isinstance(t, Tensor) else ' of 0 dimensions'}"
        )
    return int(t.shape[0])


def check_divisible(batch: int, m: int) -> None:
    if batch > 0 and batch % m == 0:
        return
    options = ", ".join(str(m * k) for k in range(1, 4))
    if batch == 0:
        raise BatchError(
            f"batch 0 is empty: it cannot be split into {m} micro-batches; use a batch of {options}…"
        )
    divisors = [d for d in range(1, batch + 1) if batch % d == 0]
    nearest = min(divisors, key=lambda d: (abs(d - m), -d))
    raise BatchError(
        f"batch {batch} is not divisible by {m} micro-batches; use a batch of {options}… "
        f"or --microbatches {nearest}"
    )


def _check_spec(spec: TensorSpec, t: Tensor, m: int) -> None:
    expected = (spec.shape[0] * m, *spec.shape[1:]) if spec.shape else ()
    if tuple(t.shape) != expected or t.dtype != spec.torch_dtype:
        got = f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
        raise BatchError(
            f"input {spec.name!r} is {got}; the plan's micro-batch is {spec.dtype}{list(spec.shape)}, so "
            f"{m} micro-batches make a batch of {spec.dtype}{list(expected)}; re-plan for this shape"
        )


_MIXED: dict[type, type] = {}


def _stage_error(error: Exception, message: str) -> Exception:
    """A `StageError` that is also an instance of ``type(error)``, when that type allows it."""
    cls = type(error)
    try:
        mixed = _MIXED.get(cls)
        if mixed is None:
            mixed = _MIXED[cls] = type(
                f"Stage{cls.__name__}",
                (StageError, cls),
                {"__module__": __name__, "__str__": BaseException.__str__},
            )
        err = mixed(message)
        if str(err) == message:
            return err
    except TypeError:
        pass
    return StageError(message)


def _device(name: str | None, group: dist.ProcessGroup | None) -> torch.device:
    if name is not None:
        return torch.device(name)
    if dist.get_backend(group) == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _layout(
    built: BuiltModel, plan: Plan | None, options: PipelineOptions, world: int
) -> tuple[list[Stage], Schedule]:
    """Every stage (on meta) and the schedule, from the plan or the options; see [Note: building on meta]."""
    from partition.mode_split import modal_stages
    from partition.modes import analyze_modes
    from partition.planner import stages_for_plan
    from partition.split import split

    if plan is not None:
        if plan.num_ranks != world:
            raise PlanError(
                f"the plan is for {plan.num_ranks} ranks ({plan.num_stages} stages, {plan.virtual} "
                f"per rank), but {world} ranks are running; launch {plan.num_ranks} ranks or "
                f"re-plan with --devices {world}"
            )
        if options.microbatches not in (None, plan.microbatches):
            raise PlanError(
                f"the plan was made for {plan.microbatches} micro-batches, the options ask for "
                f"{options.microbatches}; re-plan with --microbatches {options.microbatches}"
            )
        if options.virtual not in (None, plan.virtual):
            raise PlanError(
                f"the plan has {plan.virtual} stages per rank, the options ask for {options.virtual}"
            )
        name, m, virtual = options.schedule or plan.schedule, plan.microbatches, plan.virtual
    else:
        if options.microbatches is None:
            raise PlanError("without a plan, give the number of micro-batches (microbatches=...)")
        if built.args is None:
            raise PlanError(
                "without a plan the model factory must return (model, example_inputs, loss_fn) "
                "so that the model can be traced; or pass a plan"
            )
        name, m, virtual = options.schedule or "1f1b", options.microbatches, options.virtual or 1
    schedule = build_schedule(name, world, m, virtual)  # fails early on impossible counts
    validate(schedule)
    if plan is not None:
        meta_inputs = {  # by name: the plan's inputs are the traced graph's placeholders
            s.name: torch.empty(s.shape, dtype=s.torch_dtype, device="meta")
            for s in plan.model.inputs
        }
        method: TraceMethod = "export" if plan.model.trace_method == "export" else "fx"
        analysis, other = analyze_modes(
            built.model, (), meta_inputs, method=method, order=plan.model.order
        )
        return modal_stages(analysis, other, stages_for_plan(analysis, plan)), schedule
    analysis, other = analyze_modes(built.model, built.args or (), built.kwargs, microbatches=m)
    bounds = options.bounds
    if bounds is None:
        from partition.devices import parse_devices
        from partition.solve import solve

        devices = parse_devices("cpu", world)
        bounds = solve(
            analysis.graph, devices, schedule=name, microbatches=m, virtual=virtual
        ).bounds
    if len(bounds) - 1 != world * virtual:
        raise PlanError(
            f"bounds {list(bounds)} make {len(bounds) - 1} stages; {world} ranks with {virtual} "
            f"stage(s) each need {world * virtual}"
        )
    return modal_stages(analysis, other, split(analysis.traced, analysis.graph, bounds)), schedule


def _shared_params(
    stages: list[Stage], schedule: Schedule, init_source: dict[int, str]
) -> list[_Shared]:
    """Parameters held by stages on more than one rank, with the rank whose value wins."""
    # id -> [(name, stage)]: one name may sit in several stages (an export graph reads a tied
    # weight under one name wherever it is used)
    holders: dict[int, list[tuple[str, int]]] = collections.defaultdict(list)
    for stage in stages:
        for name, p in stage.module.named_parameters(remove_duplicate=False):
            holders[id(p)].append((name, stage.index))
    shared = []
    for pid, places in holders.items():
        ranks = sorted({schedule.stage_to_rank(s) for _, s in places})
        if len(ranks) < 2:
            continue
        names = dict(places)  # name -> the last stage holding it
        source_name = init_source.get(pid, "")
        source_stage = names.get(source_name, max(s for _, s in places))
        shared.append(
            _Shared(tuple(sorted(names)), tuple(ranks), schedule.stage_to_rank(source_stage))
        )
    return sorted(shared, key=lambda s: s.names)


def _check_channel_order(schedule: Schedule) -> None:
    """Sends and receives of every link carry micro-batches in the same order; see [Note: same-peer exchange]."""
    order: dict[tuple[str, int], list[int]] = collections.defaultdict(list)
    for row in schedule.actions:
        for a in row:
            if a.kind is Kind.SEND_F:
                order["F", a.stage].append(a.microbatch)
            elif a.kind is Kind.RECV_F:
                order["F-recv", a.stage - 1].append(a.microbatch)
            elif a.kind is Kind.SEND_B:
                order["B", a.stage].append(a.microbatch)
            elif a.kind is Kind.RECV_B:
                order["B-recv", a.stage + 1].append(a.microbatch)
    for (kind, s), sent in order.items():
        if kind in ("F", "B") and order.get((f"{kind}-recv", s)) != sent:
            raise PlanError(
                f"schedule {schedule.name!r}: stage {s} sends {'activations' if kind == 'F' else 'gradients'} "
                f"for micro-batches {sent} but they are received in the order {order.get((f'{kind}-recv', s))}"
            )
