"""The plan file's schema: every field a plan, its model and each stage may hold, with its type.

`check_plan` walks a parsed plan file against the schema before anything is read from it and
raises `PlanError` naming the first field that breaks it — unknown, missing, or of the wrong
type — with its path (``stages[1].nodes.start``) and the file. A plan file is data only: nothing
in it is ever imported, evaluated or unpickled.

Fields marked optional are either derived (written for readers, recomputed on load:
``objective.bottleneck_stage``, ``objective.balance_ratio``, ``devices``, ``stages[i].time``) or
have a default (``virtual``: 1, ``shared_params``: none, ``stages[i].dispatched``: the stage's
node count, ``objective.minimised``: ``bottleneck``, ``memory_model.recompute``: false, ``auto``:
none — a plan ``plan --auto`` did not choose).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn

from partition.errors import PlanError

__all__ = ["check_plan"]


@dataclass(frozen=True)
class _Opt:
    """An optional field of this type."""

    spec: Any


@dataclass(frozen=True)
class _Map:
    """A JSON object with free keys, every value of this type (``memory``, ``shared_params``)."""

    spec: Any


_NUMBER = (int, float)
_TENSOR = {"name": str, "shape": [int], "dtype": str}
_DEVICE = {
    "name": str,
    "memory": int,
    "flops": _NUMBER,
    "bandwidth": _NUMBER,
    "latency": _NUMBER,
    "dispatch_forward": _Opt(_NUMBER),
    "dispatch_backward": _Opt(_NUMBER),
    "action_overhead": _Opt(_NUMBER),
    "message_overhead": _Opt(_NUMBER),
    "step_overhead": _Opt(_NUMBER),
    "update_rate": _Opt(_NUMBER),
}
_MODEL = {
    "class_name": str,
    "graph_hash": str,
    "num_nodes": int,
    "num_parameters": int,
    "param_bytes": int,
    "trace_method": str,
    "order": str,
    "inputs": [_TENSOR],
    "leaf_modules": _Opt([str]),
    "modes": _Opt([str]),
}
_STAGE = {
    "index": int,
    "device": _DEVICE,
    "nodes": {"start": int, "stop": int, "first": str, "last": str},
    "modules": {"first": str, "last": str},
    "flops": _NUMBER,
    "forward_flops": _NUMBER,
    "param_bytes": int,
    "memory": _Map(_NUMBER),
    "capacity": int,
    "compute_time": _NUMBER,
    "comm_time": _NUMBER,
    "time": _Opt(_NUMBER),
    "saved_bytes": _NUMBER,
    "inflight": int,
    "send_bytes": _NUMBER,
    "inputs": [_TENSOR],
    "outputs": [_TENSOR],
    "dispatched": _Opt(_NUMBER),
}
_CONFIG = {"schedule": str, "microbatches": int, "virtual": int, "devices": int, "recompute": bool}
_CANDIDATE = {
    "config": _CONFIG,
    "step_time": _NUMBER,
    "peak_memory": _NUMBER,
    "throughput": _NUMBER,
}
_AUTO = {
    "objective": str,
    "global_batch": int,
    "chosen": _CANDIDATE,
    "runner_ups": [_CANDIDATE],
    "searched": int,
    "skipped": _Opt([str]),
}
_PLAN = {
    "schema_version": int,
    "model": _MODEL,
    "schedule": str,
    "microbatches": int,
    "virtual": _Opt(int),
    "memory_model": {"optimizer": str, "master_weights": bool, "recompute": _Opt(bool)},
    "algorithm": str,
    "objective": {
        "minimised": _Opt(str),
        "bottleneck": _NUMBER,
        "bottleneck_stage": _Opt(int),
        "perfect_balance": _NUMBER,
        "balance_ratio": _Opt((int, float, type(None))),
    },
    "predicted": {"step_time": _NUMBER, "bubble": _NUMBER},
    "devices": _Opt([_DEVICE]),
    "stages": [_STAGE],
    "shared_params": _Opt(_Map([int])),
    "auto": _Opt(_AUTO),
}

_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", type(None): "null"}


def check_plan(data: Any, source: str) -> None:
    """Raise `PlanError` unless ``data`` (a parsed plan file) follows the schema.

    Args:
        data: what ``json.loads`` gave for the file.
        source: the file (or ``"the plan"``), named in the message.
    """
    _check(data, _PLAN, "", source)


def _check(value: Any, spec: Any, path: str, source: str) -> None:
    where = path or "the plan"
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            _fail(source, f"{where} must be a JSON object, got {_kind(value)}")
        unknown = [k for k in value if k not in spec]
        if unknown:
            _fail(
                source,
                f"unknown field {_join(path, unknown[0])!r}; {where} has the fields "
                f"{', '.join(spec)}",
            )
        for key, sub in spec.items():
            if key not in value:
                if not isinstance(sub, _Opt):
                    _fail(source, f"missing field {_join(path, key)!r}")
                continue
            _check(value[key], sub.spec if isinstance(sub, _Opt) else sub, _join(path, key), source)
    elif isinstance(spec, _Map):
        if not isinstance(value, dict):
            _fail(source, f"{where} must be a JSON object, got {_kind(value)}")
        for key, item in value.items():
            _check(item, spec.spec, _join(path, key), source)
    elif isinstance(spec, list):
        if not isinstance(value, list):
            _fail(source, f"{where} must be a list, got {_kind(value)}")
        for i, item in enumerate(value):
            _check(item, spec[0], f"{path}[{i}]", source)
    else:
        types = spec if isinstance(spec, tuple) else (spec,)
        ok = isinstance(value, types) and (bool in types or not isinstance(value, bool))
        if not ok:
            names = ["a number" if t is float else _TYPE_NAMES[t] for t in types if t is not int]
            wanted = " or ".join(names if float in types else [_TYPE_NAMES[t] for t in types])
            _fail(source, f"field {where!r} must be {wanted}, got {_kind(value)}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _fail(source: str, problem: str) -> NoReturn:
    raise PlanError(
        f"{source} is malformed: {problem}. Re-create it with `pipepart plan ... --out FILE` "
        "(plan files are written by pipepart; edit one only to change values, not fields)"
    )
