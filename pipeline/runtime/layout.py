"""Where every stage is and what each rank runs: the stages (on meta) and the schedule, from a
plan or from the options, checked before any process talks to another.

Given a plan, a rank traces the model (on meta, cheap and identical on every rank) and cuts it
where the plan says, in the plan's node order — nothing is costed; the plan must be for this
world size and these micro-batches. Without one,
the partitioner splits it for ``world`` CPU-like devices (or ``bounds`` say where). Both modes are
traced when the model reads ``self.training`` (`partition.modes.modal`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from partition.errors import PeerError, PlanError
from partition.models.registry import BuiltModel
from partition.plan import Plan
from partition.schedules.actions import Schedule, build_schedule
from partition.schedules.check import validate
from partition.schedules.names import canonical_schedule
from partition.split import Stage
from partition.trace.fx import TraceMethod
from pipeline.runtime.options import PipelineOptions

__all__ = ["agree_on_layout", "layout"]


def layout(
    built: BuiltModel, plan: Plan | None, options: PipelineOptions, world: int
) -> tuple[list[Stage], Schedule]:
    """Every stage (on meta) and the schedule, from the plan or the options; see [Note: building on meta]."""
    from partition.modes.modal import analyze_modes, trace_modes
    from partition.modes.split import modal_stages
    from partition.planning.analysis import stages_for_plan
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
        if options.schedule is not None and canonical_schedule(
            options.schedule
        ) != canonical_schedule(plan.schedule):
            raise PlanError(  # its memory budget and prediction are that schedule's
                f"the plan was made for the {plan.schedule!r} schedule, the options ask for "
                f"{options.schedule!r}; re-plan with --schedule {options.schedule}, or leave "
                "the schedule to the plan (schedule=None)"
            )
        plan.check_model_class(type(built.model).__name__)
        name, m, virtual = plan.schedule, plan.microbatches, plan.virtual
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
        traced, other = trace_modes(built.model, (), meta_inputs, method=method)
        return modal_stages(traced, other, stages_for_plan(traced, plan)), schedule
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
    stages = split(analysis.traced, analysis.graph, bounds)
    return modal_stages(analysis.traced, other, stages), schedule


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
