"""A pipeline checkpoint: every rank saves its part under the model's own names, any split loads it.

Typical use, on every rank (both are collectives)::

    pipe.save("ckpt", data_position=step, keep=3)      # ckpt/step-00000010/
    info = pipe.load("ckpt")                           # the newest complete one
    for step in range(info.data_position, steps): ...

``save_checkpoint(pipe, root)`` writes ``ROOT/step-<pipe.steps_done>/``::

    tensors/.metadata        DCP's index of every tensor (rank 0)
    tensors/__R_0.distcp     rank R's tensors, through DCP: its stages' parameters and persistent
                             buffers, its optimizer state, its RNG states (see
                             [Note: checkpoint keys] in `pipeline.checkpoint.state`)
    rank-0000R.json          rank R's other state: optimizer hyper-parameters and non-tensor
                             state by parameter name, the LR scheduler, tied-weight aliases
    rank-0000R.sha256        sha256 and size of every file rank R wrote
    manifest.json            last, by rank 0: every file with its checksum; step, data position,
                             ``extra``; world size, schedule, stage bounds, model identity, plan

It is written as ``ROOT/.tmp-step-N/`` and renamed once complete (see [Note: complete or absent]
in `pipeline.checkpoint.store`). `load_checkpoint` restores it under any split, schedule or world
size: each rank asks DCP for the names its own stages hold (DCP reads by key, which is why it is
used; what DCP cannot promise is in [Note: nothing from a file runs]). `save_checkpoint_async`
saves in a background thread (see [Note: asynchronous save] in `pipeline.checkpoint.write`).
With replicas (``dp > 1``) replica 0 writes one copy and every replica joins the save and learns
its outcome; any ``dp`` loads it (see [Note: one copy across replicas] in
`pipeline.checkpoint.replicas`); sharded replicas (``dp_reduce="fsdp"``) write and read the same
files (see [Note: checkpoints of sharded replicas] in `pipeline.checkpoint.sharded`).
`export_checkpoint` writes the whole model's ``state_dict`` as one safetensors file.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from partition.errors import CheckpointError
from pipeline.checkpoint.replicas import gather_replicas, place
from pipeline.checkpoint.state import (
    Checkpointable,
    check_index,
    check_model,
    model_identity,
    optimizer_reads,
    rank_tensors,
    restore_rng,
    rng_label,
)
from pipeline.checkpoint.store import (
    MANIFEST,
    latest_complete,
    load_tensors,
    part_name,
    prune_checkpoints,
    read_index,
    read_json,
    resolve,
)
from pipeline.checkpoint.write import (
    PendingCheckpoint,
    snapshot,
    start,
    wait_pending,
    write_once,
)
from pipeline.parallel.fsdp import shard_of
from pipeline.runtime.finite import nonfinite_names

__all__ = [
    "CheckpointInfo",
    "PendingCheckpoint",
    "export_checkpoint",
    "latest_complete",
    "load_checkpoint",
    "prune_checkpoints",
    "save_checkpoint",
    "save_checkpoint_async",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointInfo:
    """What `load_checkpoint` restored."""

    path: Path
    step: int
    """The step it was saved at; ``pipe.steps_done`` is set to it."""
    data_position: int
    """What the caller passed as ``save_checkpoint(data_position=...)``."""
    extra: dict[str, Any] = field(default_factory=dict)
    """What the caller passed as ``save_checkpoint(extra=...)`` (rank 0's)."""
    skipped: tuple[tuple[Path, str], ...] = ()
    """Newer checkpoints under the root that were not complete, and why."""
    rng_restored: bool = False
    """Whether this rank's RNG states were restored (only under the saved world size, in a
    replica that was saved)."""
    nonfinite: tuple[str, ...] = ()
    """This rank's parameters and buffers that the checkpoint gave a NaN or inf (a save of a
    run that had diverged, by a pipepart that published such saves); logged as a warning."""


# --- save --------------------------------------------------------------------------------------


def _meta(data_position: int, extra: dict[str, Any] | None, keep: int | None) -> dict[str, Any]:
    """The caller's part of the manifest, checked alike on every rank before any collective."""
    try:
        meta = json.loads(json.dumps({"data_position": int(data_position), "extra": extra or {}}))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"extra= must be a JSON-serialisable dict: {e}") from e
    if not isinstance(meta["extra"], dict):
        raise CheckpointError(f"extra= must be a dict, got {type(extra).__name__}")
    if keep is not None and keep < 1:
        raise CheckpointError(f"keep must be at least 1 (the checkpoint just written), got {keep}")
    return meta


def save_checkpoint(
    pipe: Checkpointable,
    root: str | Path,
    *,
    data_position: int = 0,
    extra: dict[str, Any] | None = None,
    keep: int | None = None,
) -> Path:
    """Save this pipeline's state as ``root/step-<steps_done>`` (a collective: every rank calls it).

    Args:
        data_position: where the caller is in its data; `load_checkpoint` gives it back.
        extra: anything JSON-serialisable the caller wants back (rank 0's is stored).
        keep: afterwards delete what is older than the ``keep`` newest complete checkpoints
            (`prune_checkpoints`).

    Returns:
        The published directory (on every rank, once it is published).

    Raises:
        CheckpointError: bad arguments, before any collective; a rank's weights (in any
            replica) are not finite (a checkpoint of them is never published: [Note:
            non-finite steps] in `pipeline.runtime.finite`); another job holds ``root`` (rank 0
            holds it for the pipeline's lifetime from the first save: [Note: one job per folder] in
            `pipeline.checkpoint.lock`); or a rank failed to write its part. Raised on every
            rank, naming it; nothing is then published and the ``.tmp-`` folder is removed.
    """
    meta = _meta(data_position, extra, keep)
    wait_pending(pipe)
    snap = _snapshot(pipe, meta, copy_tensors=False)
    return write_once(pipe, snap, Path(root), keep, (pipe.group, place(pipe).group))


def save_checkpoint_async(
    pipe: Checkpointable,
    root: str | Path,
    *,
    data_position: int = 0,
    extra: dict[str, Any] | None = None,
    keep: int | None = None,
) -> PendingCheckpoint:
    """`save_checkpoint` in a background thread: returns once this rank's state is copied to
    host memory; training may go on. ``.wait()`` gives the directory (see
    [Note: asynchronous save]). A collective like `save_checkpoint`; the first call creates the
    pipeline's checkpoint group (a collective of its ranks too). Call ``.wait()`` before the
    process group is destroyed; a failure is raised there, or by the next save or load."""
    meta = _meta(data_position, extra, keep)
    wait_pending(pipe)
    return start(pipe, _snapshot(pipe, meta, copy_tensors=True), Path(root), keep)


def _snapshot(pipe: Checkpointable, meta: dict[str, Any], *, copy_tensors: bool) -> Any:
    """What this rank writes (a `pipeline.checkpoint.write.Snapshot`), or None on a replica
    other than the first, which writes nothing; a collective over the dp group with replicas
    (see [Note: one copy across replicas] in `pipeline.checkpoint.replicas`, and [Note:
    checkpoints of sharded replicas] in `pipeline.checkpoint.sharded`)."""
    others = gather_replicas(pipe)
    where = place(pipe)
    if where.replica > 0:
        if where.sharded:  # joins the gathers: see pipeline.checkpoint.sharded
            snapshot(pipe, meta, copy_tensors=False)
        return None
    return snapshot(pipe, meta, copy_tensors=copy_tensors, replicas=others)


# --- load --------------------------------------------------------------------------------------


def load_checkpoint(pipe: Checkpointable, path_or_root: str | Path) -> CheckpointInfo:
    """Restore a checkpoint into this rank's stages, optimizer, LR scheduler and RNG (a collective).

    Args:
        path_or_root: a ``step-N`` directory, or a root whose newest complete one is taken.

    Raises:
        CheckpointError: before any collective and on every rank when it can be known there: no
            complete checkpoint (why), a file that fails its checksum or escapes the directory,
            another model's checkpoint (both named), a tensor of another shape (named, both
            shapes), another optimizer; and on every rank if DCP fails reading a file.
    """
    wait_pending(pipe)  # a save of this pipeline still in flight
    path, skipped = resolve(Path(path_or_root))
    manifest = read_json(path / MANIFEST)
    check_model(path, manifest["model"], model_identity(pipe))
    metadata = read_index(path, manifest)
    index = metadata.state_dict_metadata
    parts = [read_json(path / part_name(r)) for r in range(manifest["world_size"])]
    check_index(path, manifest, parts, index)
    local = rank_tensors(pipe)
    state: dict[str, Tensor] = {}
    for key, (t, names) in local.items():
        found = next((f"model/{n}" for n in [key, *names] if f"model/{n}" in index), None)
        if found is None:
            raise CheckpointError(f"{path} lacks the tensor {key!r} (also named {names})")
        state[found] = t.detach()  # read in place, into the parameter itself (fsdp: its shard)
    key_of = {id(t): key for key, (t, _) in local.items()}
    optim_tensors, build = optimizer_reads(path, pipe.optimizer, parts, pipe.rank, key_of, index)
    if pipe.optimizer is not None and build is None:
        log.warning("%s holds no optimizer state: the optimizer starts afresh", path)
    state.update(optim_tensors)
    label = rng_label(pipe.rank, place(pipe).replica)  # this rank of this replica's stream
    own_rng = manifest["world_size"] == pipe.world_size and f"rng/{label}/cpu" in index
    if own_rng:
        for key, md in index.items():
            if key.startswith(f"rng/{label}/"):
                state[key] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    load_tensors(state, path, metadata, pipe.group)

    if pipe.optimizer is not None and build is not None:
        pipe.optimizer.load_state_dict(build(state))
    source = parts[pipe.rank] if pipe.rank < len(parts) else parts[0]
    if pipe.lr_scheduler is not None and source.get("scheduler") is not None:
        pipe.lr_scheduler.load_state_dict(source["scheduler"])
    if own_rng:
        restore_rng(state, label)
    pipe.steps_done = int(manifest["step"])
    log.info("loaded %s (step %d) on rank %d", path, pipe.steps_done, pipe.rank)
    bad = nonfinite_names((key, shard_of(t)) for key, (t, _) in local.items())  # fsdp: own
    if bad:
        log.warning(
            "rank %d: %s holds %d weight tensor(s) that are not finite, the first %r: training "
            "from it trains NaN",
            pipe.rank,
            path,
            len(bad),
            bad[0],
        )
    return CheckpointInfo(
        path=path,
        step=int(manifest["step"]),
        data_position=int(manifest["data_position"]),
        extra=dict(manifest["extra"]),
        skipped=tuple(skipped),
        rng_restored=own_rng,
        nonfinite=tuple(bad),
    )


# --- export ------------------------------------------------------------------------------------


def export_checkpoint(path: str | Path, out_file: str | Path) -> Path:
    """Write the whole model's ``state_dict`` from a checkpoint (every rank's part) as one
    safetensors file, every name of a tied tensor included: loadable by ``model.load_state_dict``
    and as ``PipelineOptions(checkpoint=...)``. Needs no process group; holds the model in memory.

    Args:
        path: a ``step-N`` directory, or a root (its newest complete checkpoint).

    Raises:
        CheckpointError: no complete checkpoint there, or a file that fails its checks.
    """
    from safetensors.torch import save_file

    found, _ = resolve(Path(path))
    manifest = read_json(found / MANIFEST)
    index = read_index(found, manifest)
    state = {
        key: torch.empty(tuple(md.size), dtype=md.properties.dtype)
        for key, md in index.state_dict_metadata.items()
        if key.startswith("model/")
    }
    load_tensors(state, found, index, None, no_dist=True)
    key_of: dict[str, str] = {}
    for r in range(manifest["world_size"]):
        for key, names in read_json(found / part_name(r))["aliases"].items():
            key_of.update({n: key for n in names})
    out: dict[str, Tensor] = {}
    for name in manifest["model"]["tensors"]:
        key = f"model/{key_of.get(name, name)}"
        if key not in state:
            raise CheckpointError(f"{found} lacks the tensor {name!r}")
        out[name] = state[key] if key == f"model/{name}" else state[key].clone()
    out_file = Path(out_file)
    tmp = out_file.with_name(out_file.name + ".tmp")
    save_file(out, str(tmp), metadata={"pipepart.step": str(manifest["step"])})
    os.replace(tmp, out_file)
    return out_file
