"""pipepart's pipeline: schedules as data, the simulator, the planner that uses them
(`plan_model`), and the runtime that trains a split model.

Names are imported on first use, so importing a schedule does not start torch.distributed.
As in `partition` (see [Note: no name is a submodule's] there), no public name is a submodule's:
the simulator is `simulate_schedule` (``pipeline.simulate.simulate``), since ``pipeline.simulate``
is the module as soon as anything imports it. The errors a run raises are exported here too;
they are defined, with every other pipepart error, in `partition.errors`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from partition.errors import BatchError, BoundaryError, PeerError, StageError
    from partition.options import PlanOptions
    from pipeline.gantt import plot_gantt
    from pipeline.launch import run_pipeline
    from pipeline.planning import plan_analysis, plan_model, reprice, simulate_plan
    from pipeline.runtime import Pipeline, PipelineOptions
    from pipeline.schedule_check import validate
    from pipeline.schedules import Action, Kind, Schedule, build_schedule
    from pipeline.simulate import SimResult
    from pipeline.simulate import simulate as simulate_schedule

_WHERE: dict[str, tuple[str, str]] = {
    "BatchError": ("partition.errors", "BatchError"),
    "BoundaryError": ("partition.errors", "BoundaryError"),
    "PeerError": ("partition.errors", "PeerError"),
    "StageError": ("partition.errors", "StageError"),
    "plot_gantt": ("pipeline.gantt", "plot_gantt"),
    "run_pipeline": ("pipeline.launch", "run_pipeline"),
    "PlanOptions": ("partition.options", "PlanOptions"),
    "plan_analysis": ("pipeline.planning", "plan_analysis"),
    "plan_model": ("pipeline.planning", "plan_model"),
    "reprice": ("pipeline.planning", "reprice"),
    "simulate_plan": ("pipeline.planning", "simulate_plan"),
    "Pipeline": ("pipeline.runtime", "Pipeline"),
    "PipelineOptions": ("pipeline.runtime", "PipelineOptions"),
    "Action": ("pipeline.schedules", "Action"),
    "Kind": ("pipeline.schedules", "Kind"),
    "Schedule": ("pipeline.schedules", "Schedule"),
    "build_schedule": ("pipeline.schedules", "build_schedule"),
    "validate": ("pipeline.schedule_check", "validate"),
    "SimResult": ("pipeline.simulate", "SimResult"),
    "simulate_schedule": ("pipeline.simulate", "simulate"),
}
"""Public name -> (module, its name there)."""

__all__ = [
    "Action",
    "BatchError",
    "BoundaryError",
    "Kind",
    "PeerError",
    "Pipeline",
    "PipelineOptions",
    "PlanOptions",
    "Schedule",
    "SimResult",
    "StageError",
    "build_schedule",
    "plan_analysis",
    "plan_model",
    "plot_gantt",
    "reprice",
    "run_pipeline",
    "simulate_plan",
    "simulate_schedule",
    "validate",
]


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    module, attribute = where
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
