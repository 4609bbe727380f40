"""pipepart's pipeline: schedules as data, the simulator, and the runtime that trains a split model.

Names are imported on first use, so importing a schedule does not start torch.distributed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.gantt import plot_gantt
    from pipeline.launch import run_pipeline
    from pipeline.runtime import BatchError, Pipeline, PipelineOptions
    from pipeline.schedules import Action, Kind, Schedule, build_schedule, validate
    from pipeline.simulate import SimResult, simulate

_WHERE = {
    "plot_gantt": "gantt",
    "run_pipeline": "launch",
    "BatchError": "runtime",
    "Pipeline": "runtime",
    "PipelineOptions": "runtime",
    "Action": "schedules",
    "Kind": "schedules",
    "Schedule": "schedules",
    "build_schedule": "schedules",
    "validate": "schedules",
    "SimResult": "simulate",
    "simulate": "simulate",
}

__all__ = [
    "Action",
    "BatchError",
    "Kind",
    "Pipeline",
    "PipelineOptions",
    "Schedule",
    "SimResult",
    "build_schedule",
    "plot_gantt",
    "run_pipeline",
    "simulate",
    "validate",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"pipeline.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
