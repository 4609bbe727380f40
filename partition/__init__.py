"""pipepart's planner: trace a model on meta, cost every node, split it optimally, write the plan."""

from partition.cost import CostGraph, cost_model
from partition.devices import PRESETS, Device, parse_devices
from partition.errors import InfeasibleError, InputError, PipepartError, PlanError, TraceError
from partition.memory import MemoryModel
from partition.plan import Plan
from partition.planner import Analysis, analyze, plan_model, reprice
from partition.solve import solve
from partition.split import Stage, split
from partition.trace import TracedModel, trace

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
