"""pipepart's planner: trace a model on meta, cost every node, split it optimally, write the plan.

Names are imported on first use, so ``import partition.errors`` (which every module does) does not
pull in torch's tracing machinery.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from partition.cost import CostGraph, cost_model
    from partition.devices import PRESETS, Device, parse_devices
    from partition.errors import InfeasibleError, InputError, PipepartError, PlanError, TraceError
    from partition.memory import MemoryModel
    from partition.plan import Plan
    from partition.planner import Analysis, analyze, plan_model, reprice
    from partition.solve import solve
    from partition.split import Stage, split
    from partition.trace import TracedModel, trace

_WHERE = {
    "CostGraph": "cost",
    "cost_model": "cost",
    "PRESETS": "devices",
    "Device": "devices",
    "parse_devices": "devices",
    "InfeasibleError": "errors",
    "InputError": "errors",
    "PipepartError": "errors",
    "PlanError": "errors",
    "TraceError": "errors",
    "MemoryModel": "memory",
    "Plan": "plan",
    "Analysis": "planner",
    "analyze": "planner",
    "plan_model": "planner",
    "reprice": "planner",
    "solve": "solve",
    "Stage": "split",
    "split": "split",
    "TracedModel": "trace",
    "trace": "trace",
}

__all__ = [
    "PRESETS",
    "Analysis",
    "CostGraph",
    "Device",
    "InfeasibleError",
    "InputError",
    "MemoryModel",
    "PipepartError",
    "Plan",
    "PlanError",
    "Stage",
    "TraceError",
    "TracedModel",
    "analyze",
    "cost_model",
    "parse_devices",
    "plan_model",
    "reprice",
    "solve",
    "split",
    "trace",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'partition' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"partition.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
