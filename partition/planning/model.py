"""The front door of planning: `plan_model` traces, costs and splits a model into a `Plan`;
`plan_analysis` splits an already analysed one (cheap, so trying many splits is too).

The partitioner prices each stage's in-flight micro-batches from the schedule's own actions
(`partition.schedules.inflight`) and the plan's step time comes from the simulator
(`partition.planning.predict`): one package answers where to cut, under which schedule, and how
long a step takes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from partition.devices import Device
from partition.errors import PlanError
from partition.modes.split import modal_stages
from partition.options import PlanOptions, with_knobs
from partition.plan import Plan
from partition.planning.analysis import Analysis, analyze
from partition.planning.assemble import build_plan
from partition.split import split

if TYPE_CHECKING:
    from partition.auto_choice import Candidate, Config
    from partition.planning.auto import AutoOptions, AutoResult

__all__ = ["plan_analysis", "plan_auto", "plan_model"]

Progress = Callable[[str], None]


def plan_model(
    model: nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor,
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    devices: Sequence[Device],
    options: PlanOptions | None = None,
    progress: Progress | None = None,
    **knobs: Any,
) -> Plan:
    """Plan ``model`` over ``devices``: the one call most users need.

    Args:
        model: the model, on any device (``meta`` for models larger than memory).
        example_inputs: one full batch (see [Note: micro-batch shapes] in `partition.planning.analysis`).
        devices: one per pipeline rank, in pipeline order.
        options: see `PlanOptions` (schedule, micro-batches, memory model, algorithm, cuts...).
        progress: called with a line of text as each phase starts.
        knobs: `PlanOptions` fields given one by one (``microbatches=8``), over ``options``.

    Raises:
        InputError, TraceError: the inputs or the model cannot be traced.
        InfeasibleError: no split fits; the message says what would.
    """
    options = with_knobs(options, knobs)
    if not devices:
        raise PlanError("no devices given")
    analysis = analyze(
        model,
        example_inputs,
        example_kwargs,
        options=options,
        profile_on=devices[0] if options.profile else None,
        progress=progress,
    )
    if progress:
        progress(f"partitioning {len(analysis.graph)} nodes over {len(devices)} devices")
    return plan_analysis(analysis, devices, options)


def plan_analysis(
    analysis: Analysis,
    devices: Sequence[Device],
    options: PlanOptions | None = None,
    **knobs: Any,
) -> Plan:
    """A plan of an already traced and costed model — cheap, so trying many splits is too.

    ``options`` (or ``knobs``, its fields one by one) default to the analysis' micro-batches and
    `PlanOptions`' other defaults; its tracing fields are not used (the model is traced already).
    """
    if options is None:
        options = PlanOptions(microbatches=analysis.microbatches)
    options = with_knobs(options, knobs)
    solution = analysis.solve(devices, options)
    stages = split(analysis.traced, analysis.graph, solution.bounds)
    modal_stages(analysis.traced, analysis.other, stages)  # raises where a cut does not carry over
    return build_plan(analysis, solution, stages=stages)


def plan_auto(
    model: nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor,
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    pool: Sequence[Device],
    auto: AutoOptions,
    options: PlanOptions | None = None,
    progress: Progress | None = None,
) -> Plan:
    """Search the configuration (schedule, micro-batches, recompute, device count) and plan the
    best: ``pipepart plan --auto``. See [Note: the configuration search] in
    `partition.planning.auto`.

    Args:
        example_inputs: one global batch (``auto.global_batch`` rows).
        pool: the devices in pipeline order; a count past them repeats the last.
        auto: what to search, and by which objective.
        options: the other planning options (memory model, objective of each split...).

    Returns:
        The plan of the best configuration, its `Plan.auto` naming the runner-ups.

    Raises:
        InfeasibleError: no configuration fits; the message says the fewest devices that do.
    """
    from partition.planning.auto import devices_for, divisors, interpolated, search_configs

    options = options or PlanOptions()
    if not pool:
        raise PlanError("no devices given")
    traced: dict[int, Analysis] = {}

    def analysis_at(m: int) -> Analysis:
        if m not in traced:
            if progress:
                progress(f"tracing at {m} micro-batches")
            traced[m] = analyze(
                model,
                example_inputs,
                example_kwargs,
                options=replace(options, microbatches=m),
                profile_on=pool[0] if options.profile else None,
                progress=progress,
            )
        return traced[m]

    counts = auto.microbatches or divisors(auto.global_batch)
    lo, hi = min(counts), max(counts)

    def analysis_for(m: int) -> Analysis:
        """Traced at the fewest and the most; the counts between interpolated (see the Note)."""
        if options.profile or m in traced:
            return analysis_at(m)
        between = interpolated(analysis_at(lo), analysis_at(hi), m)
        return between if between is not None else analysis_at(m)

    result = search_configs(analysis_for, pool, options, auto, progress)
    best = result.ranked[0].candidate.config
    if progress:
        progress(f"auto: planning {best.describe()}")
    chosen = replace(
        options,
        schedule=best.schedule,
        microbatches=best.microbatches,
        virtual=best.virtual,
        memory=replace(options.memory, recompute=best.recompute),
    )
    plan = plan_analysis(analysis_at(best.microbatches), devices_for(pool, best.devices), chosen)
    return replace(plan, auto=_record(result, auto, _candidate(plan, best, auto.global_batch)))


def _candidate(plan: Plan, config: Config, global_batch: int) -> Candidate:
    """What ``plan`` (made for ``config``) predicts, as a `Candidate`."""
    from partition.auto_choice import Candidate

    step = plan.step_time
    return Candidate(
        config=config,
        step_time=step,
        peak_memory=max(
            sum(s.memory["total"] for s in plan.stages if plan.stage_rank(s.index) == r)
            for r in range(plan.num_ranks)
        ),
        throughput=global_batch / step / config.devices if step > 0 else float("inf"),
    )


def _record(result: AutoResult, auto: AutoOptions, chosen: Candidate) -> Any:
    """The `AutoChoice` a plan keeps: the chosen (as planned) and the runner-ups."""
    from partition.auto_choice import AutoChoice

    runners = [p.candidate for p in result.ranked if p.candidate.config != chosen.config]
    return AutoChoice(
        objective=auto.objective,
        global_batch=auto.global_batch,
        chosen=chosen,
        runner_ups=tuple(runners[: auto.top]),
        searched=result.searched,
        skipped=result.skipped[:20],
    )
