"""A rank's state by the model's names: its tensors, its optimizer by parameter name, its RNG, and
the whole model's identity that a checkpoint must match. `pipeline.checkpoint.save_load` saves and loads it.

[Note: checkpoint keys]
DCP keys are ``model/<name>``, ``optim/<name>/<state>`` and ``rng/<rank>/<device>``, where a name
is the tensor's fully-qualified name in the original model. A tensor known under several names (a
tied embedding and LM head, on one rank or across ranks, see `pipeline.runtime.tied`) is stored once,
under the smallest of all its names in the whole model — the same key under every split — and its
other names are recorded as aliases; loading the key writes every name, since they share one
tensor. Copies of a tied weight on two ranks are bit-equal, and DCP keeps one of a key that
several ranks save. Optimizer state is keyed by the parameter's key, never by index (indices
restart on every rank); hyper-parameters and non-tensor state go to JSON. RNG states are per rank
and restored only under the saved world size (another split draws its dropout masks elsewhere);
with replicas, rank ``r`` of replica ``q > 0`` is ``rng/<r>.<q>/<device>`` (see [Note: one copy
across replicas] in `pipeline.checkpoint.replicas`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from partition.errors import CheckpointError
from pipeline.checkpoint.sharded import read_target

if TYPE_CHECKING:
    from partition.plan import Plan
    from partition.schedules.actions import Schedule
    from partition.split import Stage
    from pipeline.runtime.tied import TiedWeights

__all__ = ["Checkpointable"]


class Checkpointable(Protocol):
    """What a checkpoint reads of a `pipeline.runtime.pipeline.Pipeline`, and ``steps_done``, which it
    sets. Named here rather than imported: the runtime imports the checkpoint, never the reverse."""

    @property
    def rank(self) -> int: ...
    @property
    def world_size(self) -> int: ...
    @property
    def group(self) -> Any: ...
    @property
    def stages(self) -> Sequence[Stage]: ...
    @property
    def my_stages(self) -> Sequence[int]: ...
    @property
    def schedule(self) -> Schedule: ...
    @property
    def num_microbatches(self) -> int: ...
    @property
    def tied(self) -> TiedWeights: ...
    @property
    def optimizer(self) -> Any: ...
    @property
    def lr_scheduler(self) -> Any: ...
    @property
    def plan(self) -> Plan | None: ...
    @property
    def model_class(self) -> str: ...

    steps_done: int


BuildOptimizerState = Callable[[dict[str, Tensor]], dict[str, Any]]
"""Given the tensors read, the optimizer's ``state_dict`` to load."""


def model_identity(pipe: Checkpointable) -> dict[str, Any]:
    """The whole model's class, every tensor's shape and dtype, and their hash: the same on every
    rank (the other ranks' stages are on meta) and under every split. The plan's graph hash is
    recorded too, not compared: it changes with the micro-batch shape."""
    table: dict[str, Any] = {}
    for stage in pipe.stages:
        for name, t in stage.module.state_dict(keep_vars=True).items():
            table[name] = [list(t.shape), str(t.dtype).removeprefix("torch.")]
    digest = hashlib.sha256(json.dumps(sorted(table.items())).encode()).hexdigest()[:16]
    return {
        "class_name": pipe.model_class,
        "model_hash": digest,
        "graph_hash": pipe.plan.model.graph_hash if pipe.plan is not None else None,
        "tensors": table,
    }


def check_model(path: Path, saved: dict[str, Any], mine: dict[str, Any]) -> None:
    """Raise `CheckpointError` unless the checkpoint holds this model's tensors, shape for shape."""
    theirs, ours = saved["tensors"], mine["tensors"]
    if saved["class_name"] != mine["class_name"] or set(theirs) != set(ours):
        lacking, foreign = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
        raise CheckpointError(
            f"{path} is a checkpoint of another model: {saved['class_name']} (model hash "
            f"{saved['model_hash']}, {len(theirs)} tensors), but this pipeline runs "
            f"{mine['class_name']} (model hash {mine['model_hash']}, {len(ours)} tensors); it "
            f"lacks {lacking[:3]} and has {foreign[:3]}. Load a checkpoint this model saved"
        )
    for name in sorted(ours):
        if theirs[name] != ours[name]:
            (s1, d1), (s2, d2) = theirs[name], ours[name]
            raise CheckpointError(
                f"{path}: tensor {name!r} is {d1} of shape {tuple(s1)} in the checkpoint, but "
                f"{d2} of shape {tuple(s2)} in this model ({mine['class_name']}); load a "
                "checkpoint of this model's configuration"
            )


def check_index(path: Path, manifest: dict[str, Any], parts: list[Any], index: Any) -> None:
    """Raise `CheckpointError` unless DCP's index holds every tensor the manifest and the parts
    name: the model's under their keys, every optimizer tensor, every rank's RNG. Every rank
    checks all of it alike, so an inconsistent checkpoint fails everywhere before DCP's
    collectives (not on the ranks that happen to read the missing key)."""
    try:
        key_of = {n: k for p in parts for k, names in p["aliases"].items() for n in names}
        wanted = [f"model/{key_of.get(n, n)}" for n in manifest["model"]["tensors"]]
        for part in parts:
            state = (part["optimizer"] or {}).get("state", {})
            wanted += [
                f"optim/{key}/{name}"
                for key, names in state.items()
                for name, kind in names.items()
                if kind == "tensor"
            ]
        replicas = range(int(manifest.get("dp", 1)))  # see pipeline.checkpoint.replicas
        wanted += [f"rng/{rng_label(r, q)}/cpu" for q in replicas for r in range(len(parts))]
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(
            f"{path}: a rank's part is malformed ({type(e).__name__}: {e})"
        ) from e
    missing = [k for k in dict.fromkeys(wanted) if k not in index]  # a tied weight's key once
    if missing:
        raise CheckpointError(
            f"{path}: DCP's index lacks {len(missing)} tensor(s) that the manifest and the parts "
            f"name, e.g. {missing[:3]}: the checkpoint is inconsistent"
        )


def rank_tensors(pipe: Checkpointable) -> dict[str, tuple[Tensor, list[str]]]:
    """This rank's parameters and persistent buffers: key (see [Note: checkpoint keys]) -> (the
    tensor, every name it has in the whole model)."""
    by_id: dict[int, tuple[Tensor, set[str]]] = {}
    for s in pipe.my_stages:
        for name, t in pipe.stages[s].module.state_dict(keep_vars=True).items():
            by_id.setdefault(id(t), (t, set()))[1].add(name)
    shared = [set(s.names) for s in pipe.tied.shared]
    out = {}
    for t, names in by_id.values():
        for other in shared:
            if names & other:
                names |= other
        out[min(names)] = (t, sorted(names))
    return out


def optimizer_state(optimizer: Any, key_of: dict[int, str]) -> tuple[dict[str, Tensor], Any]:
    """The optimizer's state by parameter key: tensors (for DCP), and the rest (JSON)."""
    if optimizer is None:
        return {}, None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sd = optimizer.state_dict()  # its indices count parameters in param_groups order
    tensors: dict[str, Tensor] = {}
    state: dict[str, dict[str, Any]] = {}
    for index, values in sd["state"].items():
        key = key_of[id(params[index])]
        state[key] = {}
        for name, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"optim/{key}/{name}"] = value.detach()
                state[key][name] = "tensor"
            else:
                state[key][name] = {"value": value}
    groups = [
        {
            **{k: v for k, v in g.items() if k != "params"},
            "params": [key_of[id(params[i])] for i in g["params"]],
        }
        for g in sd["param_groups"]
    ]
    return tensors, {"class": type(optimizer).__name__, "param_groups": groups, "state": state}


def optimizer_reads(
    path: Path,
    optimizer: Any,
    parts: list[Any],
    rank: int,
    key_of: dict[int, str],
    index: dict[str, Any],
) -> tuple[dict[str, Tensor], BuildOptimizerState | None]:
    """The optimizer tensors to read (allocated from DCP's ``index``), and how to build the
    ``state_dict`` to load from them, by parameter name onto this rank's indices.

    Hyper-parameters (a scheduler's learning rate) come from the same rank of the checkpoint,
    else from the first rank with an optimizer.

    Raises:
        CheckpointError: another optimizer class, or another number of parameter groups.
    """
    saved = [p["optimizer"] for p in parts if p.get("optimizer") is not None]
    if optimizer is None or not saved:
        return {}, None
    if saved[0]["class"] != type(optimizer).__name__:
        raise CheckpointError(
            f"{path} holds the state of a {saved[0]['class']} optimizer, this pipeline's is "
            f"{type(optimizer).__name__}; build the pipeline with the optimizer it was saved with"
        )
    mine = parts[rank].get("optimizer") if rank < len(parts) else None
    hyper = (mine or saved[0])["param_groups"]
    if len(hyper) != len(optimizer.param_groups):
        raise CheckpointError(
            f"{path}: the optimizer was saved with {len(hyper)} parameter group(s), this one has "
            f"{len(optimizer.param_groups)}; build it with the same optimizer factory"
        )
    kinds = {key: names for p in saved for key, names in p["state"].items()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    tensors: dict[str, Tensor] = {}
    for p in params:
        for name, kind in kinds.get(key_of[id(p)], {}).items():
            k = f"optim/{key_of[id(p)]}/{name}"
            if kind == "tensor":
                if k not in index:
                    raise CheckpointError(f"{path} lacks the optimizer tensor {k!r}")
                tensors[k] = read_target(p, index[k].size, index[k].properties.dtype)  # fsdp

    def build(loaded: dict[str, Tensor]) -> dict[str, Any]:
        state = {}
        for i, p in enumerate(params):
            kind = kinds.get(key_of[id(p)])
            if kind is not None:
                prefix = f"optim/{key_of[id(p)]}/"
                state[i] = {
                    n: loaded[prefix + n] if v == "tensor" else v["value"] for n, v in kind.items()
                }
        groups = []
        for now, then in zip(optimizer.state_dict()["param_groups"], hyper, strict=True):
            group = {k: tuple(v) if isinstance(now.get(k), tuple) else v for k, v in then.items()}
            groups.append({**group, "params": now["params"]})
        return {"state": state, "param_groups": groups}

    return tensors, build


def rng_label(rank: int, replica: int) -> str:
    """The part of an RNG state's key (``rng/<label>/<device>``) naming pipeline rank ``rank``
    of replica ``replica``: ``"3"`` in replica 0 (as a single pipeline's), ``"3.1"`` in
    replica 1; see [Note: checkpoint keys]."""
    return str(rank) if replica == 0 else f"{rank}.{replica}"


def rng_state(rank: int | str) -> dict[str, Tensor]:
    """This process's RNG states (CPU, and every CUDA device once CUDA is in use), keyed by
    ``rank`` (a pipeline rank, or an `rng_label`)."""
    out = {f"rng/{rank}/cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng/{rank}/cuda:{i}"] = s
    return out


def _device(key: str) -> int:
    return int(key.rsplit(":", 1)[1])


def restore_rng(state: dict[str, Tensor], rank: int | str) -> None:
    """Set this process's RNG states from what `rng_state` saved as ``rank``."""
    torch.set_rng_state(state[f"rng/{rank}/cpu"])
    prefix = f"rng/{rank}/cuda:"
    cuda = [state[k] for k in sorted((k for k in state if k.startswith(prefix)), key=_device)]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
