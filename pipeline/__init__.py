"""pipepart's pipeline: the runtime that trains a split model on every rank, its launcher, its
checkpoints and the ``pipepart`` command. Planning (`plan_model`, schedules, the simulator) is
`partition`'s; the names users need from it are re-exported here.

Names are imported on first use, so importing a schedule does not start torch.distributed.
As in `partition` (see [Note: no name is a submodule's] there), no public name is a submodule's:
the simulator is `simulate_schedule` (``partition.schedules.simulate.simulate``), since ``partition.schedules.simulate``
is the module as soon as anything imports it. The errors a run raises are exported here too;
they are defined, with every other pipepart error, in `partition.errors`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from partition import plan_analysis, plan_model
    from partition.errors import BatchError, BoundaryError, NonFiniteError, PeerError, StageError
    from partition.options import PlanOptions
    from partition.planning.predict import reprice, simulate_plan
    from partition.schedules.actions import Action, Kind, Schedule, build_schedule
    from partition.schedules.check import validate
    from partition.schedules.gantt import plot_gantt
    from partition.schedules.simulate import SimResult
    from partition.schedules.simulate import simulate as simulate_schedule
    from pipeline.launch.run import run_pipeline
    from pipeline.runtime.options import PipelineOptions
    from pipeline.runtime.pipeline import Pipeline

_WHERE: dict[str, tuple[str, str]] = {
    "BatchError": ("partition.errors", "BatchError"),
    "BoundaryError": ("partition.errors", "BoundaryError"),
    "NonFiniteError": ("partition.errors", "NonFiniteError"),
    "PeerError": ("partition.errors", "PeerError"),
    "StageError": ("partition.errors", "StageError"),
    "plot_gantt": ("partition.schedules.gantt", "plot_gantt"),
    "run_pipeline": ("pipeline.launch.run", "run_pipeline"),
    "PlanOptions": ("partition.options", "PlanOptions"),
    "plan_analysis": ("partition.planning.model", "plan_analysis"),
    "plan_model": ("partition.planning.model", "plan_model"),
    "reprice": ("partition.planning.predict", "reprice"),
    "simulate_plan": ("partition.planning.predict", "simulate_plan"),
    "Pipeline": ("pipeline.runtime.pipeline", "Pipeline"),
    "PipelineOptions": ("pipeline.runtime.options", "PipelineOptions"),
    "Action": ("partition.schedules.actions", "Action"),
    "Kind": ("partition.schedules.actions", "Kind"),
    "Schedule": ("partition.schedules.actions", "Schedule"),
    "build_schedule": ("partition.schedules.actions", "build_schedule"),
    "validate": ("partition.schedules.check", "validate"),
    "SimResult": ("partition.schedules.simulate", "SimResult"),
    "simulate_schedule": ("partition.schedules.simulate", "simulate"),
}
"""Public name -> (module, its name there)."""

__all__ = [
    "Action",
    "BatchError",
    "BoundaryError",
    "Kind",
    "NonFiniteError",
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
