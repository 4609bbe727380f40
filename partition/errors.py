"""The exception hierarchy: one base, each error also a standard Python type."""

from __future__ import annotations

__all__ = [
    "BatchError",
    "BoundaryError",
    "CheckpointError",
    "FactoryError",
    "InfeasibleError",
    "InputError",
    "NonFiniteError",
    "PeerError",
    "PipepartError",
    "PlanError",
    "StageError",
    "TraceError",
    "factory_error",
    "stage_error",
]


class PipepartError(Exception):
    """Base class of every error pipepart raises on purpose."""


class TraceError(PipepartError, RuntimeError):
    """The model could not be traced; the message names the module, the line and the way out."""

    hit: str = ""
    """What one trace route ran into, without the ways out (for a message naming both routes)."""
    ways_out: str = ""
    """The ways out that route itself offers ("" when it has none)."""


class PlanError(PipepartError, ValueError):
    """A plan, a device spec or a schedule is invalid or does not match the model."""


class InfeasibleError(PipepartError, ValueError):
    """No split fits the devices; the message says which node is too large or how many devices fit."""


class CheckpointError(PipepartError, ValueError):
    """A checkpoint is missing tensors, or its tensors do not match the stage."""


class FactoryError(PipepartError, RuntimeError):
    """The model factory raised; the message names the factory and how it was called."""


class StageError(PipepartError, RuntimeError):
    """A failure inside a pipeline rank, re-raised with `[rank · stage · step · action]` context."""


class NonFiniteError(StageError, FloatingPointError):
    """A step's loss or gradients are not finite (``on_nonfinite="stop"``); names the step, and
    where it can, the stage and the first tensor."""


class InputError(PipepartError, TypeError):
    """Example inputs or a batch do not match what the model or the plan expects."""


class BatchError(InputError, ValueError):
    """A batch does not fit the plan: not divisible into the micro-batches, or the wrong shape."""


class BoundaryError(PlanError):
    """A tensor about to cross a stage boundary disagrees with the plan's spec for it."""


class PeerError(PipepartError, ConnectionError):
    """A send or receive failed because the peer rank died or hung up; names the peer."""


_MIXED: dict[tuple[type, type], type] = {}


def _with_kind(kind: type[PipepartError], error: Exception, message: str) -> Exception:
    """A ``kind`` saying ``message`` that is also an instance of ``type(error)`` (class
    ``<Kind prefix><Name>``, e.g. ``StageValueError``), when that type allows it — so
    ``except ValueError`` still catches a ValueError re-raised with its context."""
    cls = type(error)
    try:
        mixed = _MIXED.get((kind, cls))
        if mixed is None:
            prefix = kind.__name__.removesuffix("Error")
            mixed = _MIXED[kind, cls] = type(
                f"{prefix}{cls.__name__}",
                (kind, cls),
                {"__module__": __name__, "__str__": BaseException.__str__},
            )
        err = mixed(message)
        if str(err) == message:
            return err
    except TypeError:
        pass
    return kind(message)


def stage_error(error: Exception, message: str) -> Exception:
    """A `StageError` saying ``message`` (a rank's error with its place), also a ``type(error)``."""
    return _with_kind(StageError, error, message)


def factory_error(error: Exception, message: str) -> Exception:
    """A `FactoryError` saying ``message`` (what the factory raised), also a ``type(error)``."""
    return _with_kind(FactoryError, error, message)
