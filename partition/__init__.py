"""pipepart's planner: trace a model on meta, cost every node, split it optimally, write the plan;
schedules as data and the simulator that predicts a plan's step (`plan_model` is the front door).

Names are imported on first use, so ``import partition.errors`` (which every module does) does not
pull in torch's tracing machinery.

[Note: no name is a submodule's]
A package attribute that is also a submodule's name is replaced by the submodule as soon as
anything imports it (``import partition.trace.fx`` sets ``partition.trace.fx``), so a function exported
under its module's name would turn into a module depending on import order. The public names
below therefore differ from every submodule's: `trace_model` is ``partition.trace.fx.trace``,
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
        NonFiniteError,
        PeerError,
        PipepartError,
        PlanError,
        StageError,
        TraceError,
    )
    from partition.memory import MemoryModel
    from partition.options import PlanOptions
    from partition.plan import Plan
    from partition.planning.analysis import Analysis, analyze
    from partition.planning.auto import AutoOptions
    from partition.planning.model import plan_analysis, plan_auto, plan_model
    from partition.planning.predict import reprice, simulate_plan
    from partition.schedules.actions import Action, Kind, Schedule, build_schedule
    from partition.schedules.check import validate
    from partition.schedules.gantt import plot_gantt
    from partition.schedules.simulate import SimResult
    from partition.schedules.simulate import simulate as simulate_schedule
    from partition.solve import solve as solve_split
    from partition.split import Stage
    from partition.split import split as build_stages
    from partition.trace.fx import trace as trace_model
    from partition.trace.traced import TracedModel

_WHERE: dict[str, tuple[str, str]] = {
    "CostGraph": ("partition.cost", "CostGraph"),
    "cost_model": ("partition.cost", "cost_model"),
    "PRESETS": ("partition.devices", "PRESETS"),
    "Device": ("partition.devices", "Device"),
    "parse_devices": ("partition.devices", "parse_devices"),
    "BatchError": ("partition.errors", "BatchError"),
    "BoundaryError": ("partition.errors", "BoundaryError"),
    "CheckpointError": ("partition.errors", "CheckpointError"),
    "FactoryError": ("partition.errors", "FactoryError"),
    "InfeasibleError": ("partition.errors", "InfeasibleError"),
    "InputError": ("partition.errors", "InputError"),
    "NonFiniteError": ("partition.errors", "NonFiniteError"),
    "PeerError": ("partition.errors", "PeerError"),
    "PipepartError": ("partition.errors", "PipepartError"),
    "PlanError": ("partition.errors", "PlanError"),
    "StageError": ("partition.errors", "StageError"),
    "TraceError": ("partition.errors", "TraceError"),
    "MemoryModel": ("partition.memory", "MemoryModel"),
    "Plan": ("partition.plan", "Plan"),
    "PlanOptions": ("partition.options", "PlanOptions"),
    "Analysis": ("partition.planning.analysis", "Analysis"),
    "analyze": ("partition.planning.analysis", "analyze"),
    "solve_split": ("partition.solve", "solve"),
    "Stage": ("partition.split", "Stage"),
    "build_stages": ("partition.split", "split"),
    "plan_model": ("partition.planning.model", "plan_model"),
    "plan_analysis": ("partition.planning.model", "plan_analysis"),
    "plan_auto": ("partition.planning.model", "plan_auto"),
    "AutoOptions": ("partition.planning.auto", "AutoOptions"),
    "reprice": ("partition.planning.predict", "reprice"),
    "simulate_plan": ("partition.planning.predict", "simulate_plan"),
    "Action": ("partition.schedules.actions", "Action"),
    "Kind": ("partition.schedules.actions", "Kind"),
    "Schedule": ("partition.schedules.actions", "Schedule"),
    "build_schedule": ("partition.schedules.actions", "build_schedule"),
    "validate": ("partition.schedules.check", "validate"),
    "plot_gantt": ("partition.schedules.gantt", "plot_gantt"),
    "SimResult": ("partition.schedules.simulate", "SimResult"),
    "simulate_schedule": ("partition.schedules.simulate", "simulate"),
    "TracedModel": ("partition.trace.traced", "TracedModel"),
    "trace_model": ("partition.trace.fx", "trace"),
}
"""Public name -> (submodule, its name there); see [Note: no name is a submodule's]."""

__all__ = [
    "PRESETS",
    "Action",
    "Analysis",
    "AutoOptions",
    "BatchError",
    "BoundaryError",
    "CheckpointError",
    "CostGraph",
    "Device",
    "FactoryError",
    "InfeasibleError",
    "InputError",
    "Kind",
    "MemoryModel",
    "NonFiniteError",
    "PeerError",
    "PipepartError",
    "Plan",
    "PlanError",
    "PlanOptions",
    "Schedule",
    "SimResult",
    "Stage",
    "StageError",
    "TraceError",
    "TracedModel",
    "analyze",
    "build_schedule",
    "build_stages",
    "cost_model",
    "parse_devices",
    "plan_analysis",
    "plan_auto",
    "plan_model",
    "plot_gantt",
    "reprice",
    "simulate_plan",
    "simulate_schedule",
    "solve_split",
    "trace_model",
    "validate",
]


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'partition' has no attribute {name!r}")
    module, attribute = where
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
