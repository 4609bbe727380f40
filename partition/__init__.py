"""pipepart's planner: trace a model on meta, cost every node, split it optimally, write the plan.

Names are imported on first use, so ``import partition.errors`` (which every module does) does not
pull in torch's tracing machinery.

[Note: no name is a submodule's]
A package attribute that is also a submodule's name is replaced by the submodule as soon as
anything imports it (``import partition.trace`` sets ``partition.trace``), so a function exported
under its module's name would turn into a module depending on import order. The public names
below therefore differ from every submodule's: `trace_model` is ``partition.trace.trace``,
`solve_split` is ``partition.solve.solve`` and `build_stages` is ``partition.split.split``;
``tests/test_public_api.py`` checks every name after importing every submodule.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from partition.cost import CostGraph, cost_model
    from partition.devices import PRESETS, Device, parse_devices
    from partition.errors import (
        BatchError,
        BoundaryError,
        CheckpointError,
        FactoryError,
        InfeasibleError,
        InputError,
        PeerError,
        PipepartError,
        PlanError,
        StageError,
        TraceError,
    )
    from partition.memory import MemoryModel
    from partition.options import PlanOptions
    from partition.plan import Plan
    from partition.planner import Analysis, analyze
    from partition.solve import solve as solve_split
    from partition.split import Stage
    from partition.split import split as build_stages
    from partition.trace import TracedModel
    from partition.trace import trace as trace_model

_WHERE: dict[str, tuple[str, str]] = {
    "CostGraph": ("cost", "CostGraph"),
    "cost_model": ("cost", "cost_model"),
    "PRESETS": ("devices", "PRESETS"),
    "Device": ("devices", "Device"),
    "parse_devices": ("devices", "parse_devices"),
    "BatchError": ("errors", "BatchError"),
    "BoundaryError": ("errors", "BoundaryError"),
    "CheckpointError": ("errors", "CheckpointError"),
    "FactoryError": ("errors", "FactoryError"),
    "InfeasibleError": ("errors", "InfeasibleError"),
    "InputError": ("errors", "InputError"),
    "PeerError": ("errors", "PeerError"),
    "PipepartError": ("errors", "PipepartError"),
    "PlanError": ("errors", "PlanError"),
    "StageError": ("errors", "StageError"),
    "TraceError": ("errors", "TraceError"),
    "MemoryModel": ("memory", "MemoryModel"),
    "Plan": ("plan", "Plan"),
    "PlanOptions": ("options", "PlanOptions"),
    "Analysis": ("planner", "Analysis"),
    "analyze": ("planner", "analyze"),
    "solve_split": ("solve", "solve"),
    "Stage": ("split", "Stage"),
    "build_stages": ("split", "split"),
    "TracedModel": ("trace", "TracedModel"),
    "trace_model": ("trace", "trace"),
}
"""Public name -> (submodule, its name there); see [Note: no name is a submodule's]."""

__all__ = [
    "PRESETS",
    "Analysis",
    "BatchError",
    "BoundaryError",
    "CheckpointError",
    "CostGraph",
    "Device",
    "FactoryError",
    "InfeasibleError",
    "InputError",
    "MemoryModel",
    "PeerError",
    "PipepartError",
    "Plan",
    "PlanError",
    "PlanOptions",
    "Stage",
    "StageError",
    "TraceError",
    "TracedModel",
    "analyze",
    "build_stages",
    "cost_model",
    "parse_devices",
    "solve_split",
    "trace_model",
]


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'partition' has no attribute {name!r}")
    module, attribute = where
    value = getattr(importlib.import_module(f"partition.{module}"), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
