"""The exception hierarchy: one base, each error also a standard Python type."""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "InfeasibleError",
    "InputError",
    "PipepartError",
    "PlanError",
    "StageError",
    "TraceError",
]


class PipepartError(Exception):
    """Base class of every error pipepart raises on purpose."""


class TraceError(PipepartError, RuntimeError):
    """The model could not be traced; the message names the module, the line and the way out."""


class PlanError(PipepartError, ValueError):
    """A plan, a device spec or a schedule is invalid or does not match the model."""


class InfeasibleError(PipepartError, ValueError):
    """No split fits the devices; the message says which node is too large or how many devices fit."""


class CheckpointError(PipepartError, ValueError):
    """A checkpoint is missing tensors, or its tensors do not match the stage."""


class StageError(PipepartError, RuntimeError):
    """A failure inside a pipeline rank, re-raised with `[rank · stage · step · action]` context."""


class InputError(PipepartError, TypeError):
    """Example inputs or a batch do not match what the model or the plan expects."""
