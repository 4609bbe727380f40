"""Where every stage is and what each rank runs: the stages (on meta) and the schedule, from the
plan, checked before any process talks to another.

[Note: one plan, made once]
Planning (tracing, costing, solving the split) is `partition.plan_model`'s, done once: by the
launcher, by the user (``pipepart plan``, or `plan_model` in their script), or — for a
`Pipeline` given no plan — by the group's first rank, which hands it to the others
(`plan_once`). A rank given a plan never calls the solver: it traces the model on meta (cheap
and identical on every rank) and cuts it where the plan says, in the plan's node order
(`partition.planning.analysis.stages_for_plan`, which also checks the plan is for this model).
Both modes are traced when the model reads ``self.training`` (`partition.modes`), or the one
mode the plan traced (`ModelInfo.modes`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

import partition.errors as errors
from partition.errors import PeerError, PipepartError, PlanError
from partition.models.registry import BuiltModel
from partition.options import Modes, PlanOptions
from partition.plan import Plan
from partition.schedules.actions import Schedule
from partition.schedules.check import validate
from partition.schedules.custom import schedule_for
from partition.schedules.names import canonical_schedule, schedule_label
from partition.split import Stage
from partition.trace.fx import TraceMethod, leaf_specs
from pipeline.runtime.options import PipelineOptions

__all__ = [
    "Layout",
    "agree_on_layout",
    "check_plan",
    "layout",
    "plan_for",
    "plan_modes",
    "plan_once",
    "planning_options",
    "recompute_of",
]


@dataclass(frozen=True)
class Layout:
    """The plan a pipeline runs, every stage of it (on meta) and the schedule."""

    plan: Plan
    stages: list[Stage]
    schedule: Schedule


def layout(
    built: BuiltModel,
    plan: Plan | None,
    options: PipelineOptions,
    world: int,
    group: dist.ProcessGroup | None = None,
) -> Layout:
    """Every stage (on meta) and the schedule of ``plan`` (without one, of the plan the group's
    first rank makes: `plan_once`); see [Note: one plan, made once]."""
    from partition.modes.modal import trace_modes
    from partition.modes.split import modal_stages
    from partition.planning.analysis import stages_for_plan

    if plan is None:
        plan = plan_once(built, options, group)
    check_plan(plan, options, world, type(built.model).__name__)
    schedule = schedule_for(plan.schedule, world, plan.microbatches, plan.virtual)
    validate(schedule)
    meta_inputs = {  # by name: the plan's inputs are the traced graph's placeholders
        s.name: torch.empty(s.shape, dtype=s.torch_dtype, device="meta") for s in plan.model.inputs
    }
    method: TraceMethod = "export" if plan.model.trace_method == "export" else "fx"
    leaves = leaf_specs(plan.model.leaf_modules)
    traced, other = trace_modes(
        built.model, (), meta_inputs, method=method, leaf_modules=leaves, modes=plan_modes(plan)
    )
    return Layout(plan, modal_stages(traced, other, stages_for_plan(traced, plan)), schedule)


def check_plan(plan: Plan, options: PipelineOptions, world: int, model_class: str) -> None:
    """Raise `PlanError` unless ``plan`` is for ``world`` ranks, for the options' schedule,
    micro-batches and stages per rank (where they name one), and for a model of this class."""
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
    if options.schedule is not None and canonical_schedule(options.schedule) != canonical_schedule(
        plan.schedule
    ):
        raise PlanError(  # its memory budget and prediction are that schedule's
            f"the plan was made for the {schedule_label(plan.schedule)!r} schedule, the options "
            f"ask for {schedule_label(canonical_schedule(options.schedule))!r}; re-plan with "
            f"--schedule {options.schedule}, or leave "
            "the schedule to the plan (schedule=None)"
        )
    if options.modes not in (None, plan_modes(plan)) and plan.model.modes:
        raise PlanError(
            f"the plan traced {' and '.join(plan.model.modes)} mode, the options ask for "
            f"modes={options.modes!r}; re-plan with --modes {options.modes}, or leave the "
            "modes to the plan (modes=None)"
        )
    if options.bounds is not None and tuple(options.bounds) != plan.bounds:
        raise PlanError(
            f"the plan cuts at {list(plan.bounds)}, the options at {list(options.bounds)}: "
            "give one of them"
        )
    plan.check_model_class(model_class)


def plan_modes(plan: Plan) -> Modes:
    """The modes a rank traces for ``plan``: the one it traced, or ``both`` (`ModelInfo.modes`)."""
    modes = plan.model.modes
    if len(modes) == 1 and modes[0] in ("train", "eval"):
        return "train" if modes[0] == "train" else "eval"
    return "both"


def plan_once(
    built: BuiltModel, options: PipelineOptions, group: dist.ProcessGroup | None = None
) -> Plan:
    """The plan for a pipeline given none: the group's first rank makes it (`plan_for`) and
    sends it to the others; a failure there is raised on every rank, with the same type and
    message. What every rank can check alone is checked first, before the broadcast."""
    world = dist.get_world_size(group)
    planned = planning_options(built, options)
    schedule_for(planned.schedule, world, planned.microbatches, planned.virtual)  # on every rank
    message: list[Any] = [None]
    failure: BaseException | None = None
    if dist.get_rank(group) == 0:
        try:
            message[0] = plan_for(built, options, world)
        except Exception as e:
            failure, message[0] = e, (type(e).__name__, str(e))
    source = dist.get_global_rank(group, 0) if group is not None else 0
    try:
        dist.broadcast_object_list(message, src=source, group=group)
    except RuntimeError as e:  # gloo: a peer ended (it says why)
        raise PeerError(
            "a peer rank ended before the ranks compared their pipeline layouts, while the "
            f"first rank shared its plan (the peer's own error says why): {e}"
        ) from e
    if failure is not None:
        raise failure
    if isinstance(message[0], Plan):
        return message[0]
    kind, text = message[0]
    error = getattr(errors, kind, None)
    if isinstance(error, type) and issubclass(error, PipepartError):
        raise error(text)
    raise PeerError(f"the first rank could not plan: {kind}: {text}")


def plan_for(built: BuiltModel, options: PipelineOptions, world: int) -> Plan:
    """The plan of a pipeline given none: `partition.plan_model` over ``world`` CPU-like
    devices, planned as `planning_options` says."""
    from partition.devices import parse_devices
    from partition.planning.model import plan_model

    return plan_model(
        built.model,
        built.args or (),
        built.kwargs,
        devices=parse_devices("cpu", world),
        options=planning_options(built, options),
    )


def planning_options(built: BuiltModel, options: PipelineOptions) -> PlanOptions:
    """How a pipeline given no plan is planned: ``options.planning`` (default `PlanOptions()`)
    with the options' own schedule, micro-batches, stages per rank and bounds over it; raises
    `PlanError` when the model cannot be planned (no example inputs, no micro-batch count)."""
    if options.microbatches is None and options.planning is None:
        raise PlanError("without a plan, give the number of micro-batches (microbatches=...)")
    if built.args is None:
        raise PlanError(
            "without a plan the model factory must return (model, example_inputs, loss_fn) "
            "so that the model can be traced; or pass a plan"
        )
    base = options.planning or PlanOptions()
    return replace(
        base,
        schedule=options.schedule or base.schedule,
        microbatches=options.microbatches or base.microbatches,
        virtual=options.virtual or (base.virtual if options.schedule is None else 1),
        bounds=options.bounds if options.bounds is not None else base.bounds,
        modes=options.modes or base.modes,
        memory=replace(base.memory, recompute=True) if options.recompute else base.memory,
    )


def recompute_of(plan: Plan | None, options: PipelineOptions) -> bool:
    """Whether stages recompute their forward in the backward: when the options ask, or when the
    plan's memory was priced so (`MemoryModel.recompute`, what ``plan --auto`` may choose) —
    without it the stages would keep more activations than the plan budgeted."""
    return options.recompute or (plan is not None and plan.memory_model.recompute)


def agree_on_layout(
    stages: Sequence[Stage], schedule: Schedule, group: dist.ProcessGroup | None = None
) -> None:
    """Raise `PlanError` on every rank unless every rank of ``group`` laid out the same pipeline.

    [Note: ranks agree before any message]
    Every rank lays its pipeline out alone (`layout`), so ranks given different plans (or
    options, or a model built differently) would each run a consistent pipeline of their own:
    receives of the wrong shape, a hang or a silently wrong loss. So before any other collective
    and any point-to-point message, the ranks all-gather a digest of their layouts — the
    schedule and its counts, every stage's nodes and boundary tensors — and every rank raises
    if any differs, naming what each rank has. A peer that failed before this point (its own
    error says why) makes the gather fail at once: a `PeerError`, never a wait.
    """
    digest = hashlib.sha256(repr(_layout_facts(stages, schedule)).encode()).hexdigest()[:12]
    cuts = [s.nodes[-1] for s in stages[:-1]]
    shown = cuts if len(cuts) <= 6 else [*cuts[:3], "...", *cuts[-2:]]
    mine = (
        f"{len(stages)} stages cut after {shown}, {schedule.name} with "
        f"{schedule.num_microbatches} micro-batches (layout {digest})"
    )
    world = dist.get_world_size(group)
    gathered: list[Any] = [None] * world
    try:
        dist.all_gather_object(gathered, (digest, mine), group=group)
    except RuntimeError as e:  # gloo: the peer closed its connection
        raise PeerError(
            "a peer rank ended before the ranks compared their pipeline layouts (its own error "
            f"says why): {e}"
        ) from e
    if len({d for d, _ in gathered}) > 1:
        described = "; ".join(f"rank {r}: {text}" for r, (_, text) in enumerate(gathered))
        raise PlanError(
            f"the ranks disagree on the plan: {described}. Give every rank the same plan (one "
            "plan file, or plan_model on the same model and inputs) and the same options"
        )


def _layout_facts(stages: Sequence[Stage], schedule: Schedule) -> tuple[Any, ...]:
    return (
        schedule.name,
        schedule.num_ranks,
        schedule.num_stages,
        schedule.num_microbatches,
        tuple((s.index, s.nodes, tuple(s.inputs), tuple(s.outputs), s.params) for s in stages),
    )
