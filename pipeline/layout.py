"""Where every stage is and what each rank runs: the stages (on meta) and the schedule, from a
plan or from the options, checked before any process talks to another.

Given a plan, a rank traces the model (on meta, cheap and identical on every rank) and cuts it
where the plan says, in the plan's node order — nothing is costed; the plan must be for this
world size and these micro-batches. Without one,
the partitioner splits it for ``world`` CPU-like devices (or ``bounds`` say where). Both modes are
traced when the model reads ``self.training`` (`partition.modes`).
"""

from __future__ import annotations

import torch

from partition.errors import PlanError
from partition.plan import Plan
from partition.registry import BuiltModel
from partition.split import Stage
from partition.trace import TraceMethod
from pipeline.options import PipelineOptions
from pipeline.schedule_check import validate
from pipeline.schedules import Schedule, build_schedule

__all__ = ["layout"]


def layout(
    built: BuiltModel, plan: Plan | None, options: PipelineOptions, world: int
) -> tuple[list[Stage], Schedule]:
    """Every stage (on meta) and the schedule, from the plan or the options; see [Note: building on meta]."""
    from partition.mode_split import modal_stages
    from partition.modes import analyze_modes, trace_modes
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
