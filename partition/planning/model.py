"""The front door of planning: `plan_model` traces, costs and splits a model into a `Plan`;
`plan_analysis` splits an already analysed one (cheap, so trying many splits is too).

The partitioner prices each stage's in-flight micro-batches from the schedule's own actions
(`partition.schedules.inflight`) and the plan's step time comes from the simulator
(`partition.planning.predict`): one package answers where to cut, under which schedule, and how
long a step takes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

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

__all__ = ["plan_analysis", "plan_model"]

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
