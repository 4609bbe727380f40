"""Writing a checkpoint: a rank's snapshot, then the collective write and publish, in the caller's
thread (`write`) or in a background thread while training goes on (`PendingCheckpoint`).

[Note: asynchronous save]
A save in the background must not see the training change its tensors, and its collectives must
not interleave with the pipeline's own. So `snapshot` copies the rank's tensors to host memory
(the peak cost: one copy of this rank's state, what DCP's own stager allocates too), and the
background thread runs the whole save — DCP's write, checksums, the gather, rank 0's manifest and
rename — over a gloo group of its own (created once per pipeline, by its ranks only). DCP's
``async_save`` is not used: its future covers DCP's writes only, while publishing needs every
rank's files written, one more collective after them, which the same thread does. One save per
pipeline is in flight at a time: a new save or a load first waits for the previous one.
"""

from __future__ import annotations

import copy
import functools
import logging
import shutil
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.api import CheckpointException

from partition.errors import CheckpointError
from pipeline.checkpoint.lock import hold_folder
from pipeline.checkpoint.replicas import FromReplicas, agree, place
from pipeline.checkpoint.sharded import gather_whole
from pipeline.checkpoint.state import (
    Checkpointable,
    model_identity,
    optimizer_state,
    rank_tensors,
    rng_state,
)
from pipeline.checkpoint.store import (
    FORMAT,
    TENSORS,
    TMP,
    VERSION,
    dcp_failure,
    file_entry,
    part_name,
    prune_checkpoints,
    publish,
    step_name,
    write_json,
)
from pipeline.runtime.finite import nonfinite_names

__all__ = ["PendingCheckpoint"]

log = logging.getLogger(__name__)

_PUBLISHED: set[Path] = set()
"""What this process published: complete, so retention need not read it again."""


@dataclass
class Snapshot:
    """What one rank writes: its tensors (for DCP), its JSON part, and the manifest but its files."""

    tensors: dict[str, Tensor]
    part: dict[str, Any]
    manifest: dict[str, Any]
    rank: int
    world: int
    elsewhere: tuple[int, int, str] | None = None
    """``(replica, how many, the first)`` of another replica's weights that are not finite."""


def snapshot(
    pipe: Checkpointable,
    meta: dict[str, Any],
    *,
    copy_tensors: bool,
    replicas: FromReplicas | None = None,
) -> Snapshot:
    """This rank's state now; with ``copy_tensors``, copied to host memory (see
    [Note: asynchronous save]), else the live tensors (written before training goes on). With
    replicas, what replica 0's rank learnt of its peers (`gather_replicas`) goes in too. With
    sharded replicas every replica calls it (a collective of the dp group: [Note: checkpoints of
    sharded replicas] in `pipeline.checkpoint.sharded`), and only replica 0's is written."""
    local = rank_tensors(pipe)
    key_of = {id(t): key for key, (t, _) in local.items()}
    tensors = {f"model/{key}": t.detach() for key, (t, _) in local.items()}
    optim_tensors, optim_json = optimizer_state(pipe.optimizer, key_of)
    tensors.update(optim_tensors)
    tensors, fresh = gather_whole(tensors, keep=place(pipe).replica == 0)  # fsdp: whole
    tensors.update(rng_state(pipe.rank))
    tensors.update(replicas.rng if replicas is not None else {})
    scheduler = pipe.lr_scheduler.state_dict() if pipe.lr_scheduler is not None else None
    part = {
        "rank": pipe.rank,
        "stages": list(pipe.my_stages),
        "aliases": {k: names for k, (_, names) in local.items() if len(names) > 1},
        "optimizer": optim_json,
        "scheduler": scheduler,
    }
    if copy_tensors:
        tensors = {k: t if k in fresh else t.to("cpu", copy=True) for k, t in tensors.items()}
        part = copy.deepcopy(part)
    sizes = [len(s.nodes) for s in pipe.stages]
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "step": pipe.steps_done,
        **meta,
        "world_size": pipe.world_size,
        "dp": place(pipe).dp,  # the replicas whose RNG states it holds
        "schedule": pipe.schedule.name,
        "microbatches": pipe.num_microbatches,
        "stage_bounds": [sum(sizes[:i]) for i in range(len(sizes) + 1)],
        "stage_ranks": [pipe.schedule.stage_to_rank(s) for s in range(len(sizes))],
        "model": model_identity(pipe),
        "plan": pipe.plan.to_dict() if pipe.plan is not None else None,
    }
    elsewhere = replicas.nonfinite if replicas is not None else None
    return Snapshot(tensors, part, manifest, pipe.rank, pipe.world_size, elsewhere)


def _all_ok(group: Any, world: int, error: str, what: str) -> list[Any]:
    """Gather every rank's ``error`` (empty when fine); raise the first on every rank."""
    got: list[Any] = [None] * world
    dist.all_gather_object(got, error, group=group)
    failed = [(r, e) for r, e in enumerate(got) if e]
    if failed:
        raise CheckpointError(f"{what} failed on rank {failed[0][0]}: {failed[0][1]}")
    return got


def _prepare(snap: Snapshot, root: Path, tmp: Path, owner: object | None) -> tuple[str, bool]:
    """This rank's part of starting a save: its weights are finite; on rank 0, the folder's lock
    (for ``owner``'s lifetime, see `pipeline.checkpoint.lock.hold_folder`) and a fresh ``tmp``.
    Returns what failed (empty when fine) and whether ``tmp`` was made here."""
    model = (
        (k.removeprefix("model/"), t) for k, t in snap.tensors.items() if k.startswith("model/")
    )
    bad = nonfinite_names(model)
    count, first, whose = len(bad), bad[0] if bad else "", ""
    if not bad and snap.elsewhere is not None:  # see pipeline.checkpoint.replicas
        replica, count, first = snap.elsewhere
        whose = f" of replica {replica}"
    if count:  # see [Note: complete or absent] in pipeline.checkpoint.store
        return (
            f"not saving {root / step_name(snap.manifest['step'])}: {count} weight tensor(s)"
            f"{whose} are not finite, the first {first!r}; a checkpoint of them would pass as "
            "complete (and --keep could delete the last good one), so the checkpoints already "
            "there stay as they are: resume from the newest with a lower --lr, --clip, or "
            "--on-nonfinite skip"
        ), False
    if snap.rank != 0:
        return "", False
    try:
        if owner is not None:
            hold_folder(owner, root)
        shutil.rmtree(tmp, ignore_errors=True)  # what a crashed save of this step left
        (tmp / TENSORS).mkdir(parents=True)
    except CheckpointError as e:  # another job holds the folder
        return str(e), False
    except OSError as e:
        return f"cannot create {tmp}: {e}", False
    return "", True


def write(snap: Snapshot, root: Path, keep: int | None, group: Any, owner: object = None) -> Path:
    """Write ``snap`` as ``root/step-N`` and publish it: a collective over ``group``; see
    [Note: complete or absent] in `pipeline.checkpoint.store`. A save that fails leaves nothing:
    every rank removes the ``.tmp-`` folder (a full disk must not stay full). Rank 0 holds the
    folder's lock for ``owner``'s lifetime (see [Note: one job per folder])."""
    final = root / step_name(snap.manifest["step"])
    tmp = root / f"{TMP}{final.name}"
    error, made = _prepare(snap, root, tmp, owner)
    started = False
    try:
        _all_ok(group, snap.world, error, "preparing the checkpoint")
        started = True
        _publish(snap, final, _write(snap, tmp, group), keep, group)
    except BaseException:
        if made or started:  # never another job's save in progress
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write(snap: Snapshot, tmp: Path, group: Any) -> dict[str, Any]:
    """Every rank's tensors (DCP), JSON part and checksums into ``tmp``: every rank's files with
    their checksums; a failure is raised on every rank."""
    rank, world = snap.rank, snap.world
    try:
        writer = dcp.FileSystemWriter(tmp / TENSORS)
        dcp.save(snap.tensors, storage_writer=writer, process_group=group)
    except (Exception, CheckpointException) as e:  # DCP raises one on every rank
        raise CheckpointError(f"writing the tensors of {tmp} failed: {dcp_failure(e)}") from e

    files: dict[str, Any] = {}
    error = ""
    try:
        write_json(tmp / part_name(rank), snap.part)
        mine = [
            part_name(rank),
            *(f"{TENSORS}/{p.name}" for p in (tmp / TENSORS).glob(f"__{rank}_*")),
        ]
        mine += [f"{TENSORS}/.metadata"] if rank == 0 else []
        files = {name: file_entry(tmp / name) for name in sorted(mine)}
        sums = tmp / f"rank-{rank:05d}.sha256"
        write_json(sums, files)
        files[sums.name] = file_entry(sums)
    except (OSError, TypeError, ValueError) as e:  # a full disk; a scheduler JSON cannot hold
        error = f"{type(e).__name__}: {e}"
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (files, error), group=group)
    failed = [(r, err) for r, (_, err) in enumerate(gathered) if err]
    if failed:
        raise CheckpointError(f"writing {tmp} failed on rank {failed[0][0]}: {failed[0][1]}")
    return {k: v for f, _ in gathered for k, v in f.items()}


def _publish(
    snap: Snapshot, final: Path, files: dict[str, Any], keep: int | None, group: Any
) -> None:
    """Rank 0 writes the manifest, renames the folder and applies ``keep``; raised on every rank."""
    error = ""
    if snap.rank == 0:
        root, tmp = final.parent, final.parent / f"{TMP}{final.name}"
        try:
            publish(tmp, final, {**snap.manifest, "files": files})
            _PUBLISHED.add(final)
            if keep is not None:
                for old in prune_checkpoints(root, keep, known_complete=_PUBLISHED):
                    _PUBLISHED.discard(old)
                    log.info("deleted checkpoint %s (keep=%d)", old, keep)
        except OSError as e:
            error = f"publishing {final}: {e}"
    _all_ok(group, snap.world, error, "publishing the checkpoint")


# --- in the background -------------------------------------------------------------------------

_PENDING: weakref.WeakKeyDictionary[Any, PendingCheckpoint] = weakref.WeakKeyDictionary()
_GROUPS: weakref.WeakKeyDictionary[Any, tuple[Any, Any]] = weakref.WeakKeyDictionary()
"""A pipeline -> its checkpoint groups: its own ranks, and (with replicas) its dp peers."""


class PendingCheckpoint:
    """A save running in a background thread; `wait` for its directory."""

    def __init__(self, job: Callable[[], Path]) -> None:
        """``job``: the save (`write_once`), run in the thread."""
        self._path: Path | None = None
        self._error: BaseException | None = None
        self.reported = False
        """Whether `wait` has given its outcome to the caller."""
        self._thread = threading.Thread(target=self._run, args=(job,), name="pipepart-checkpoint")
        self._thread.start()

    def _run(self, job: Callable[[], Path]) -> None:
        try:
            self._path = job()
        except BaseException as e:  # handed to wait(), in the caller's thread
            self._error = e

    def done(self) -> bool:
        """Whether the save has finished (published or failed)."""
        return not self._thread.is_alive()

    def wait(self) -> Path:
        """The published directory, once the save finished.

        Raises:
            CheckpointError: the save failed (on every rank, naming the rank).
        """
        self._thread.join()
        self.reported = True
        if self._error is not None:
            if isinstance(self._error, CheckpointError):
                raise self._error
            raise CheckpointError(f"the background save failed: {self._error}") from self._error
        assert self._path is not None
        return self._path


def wait_pending(pipe: Checkpointable) -> None:
    """Finish this pipeline's save in flight, if any (raising its error)."""
    pending = _PENDING.pop(pipe, None)
    if pending is not None and not pending.reported:  # else the caller has had its outcome
        pending.wait()


def write_once(
    pipe: Checkpointable,
    snap: Snapshot | None,
    root: Path,
    keep: int | None,
    groups: tuple[Any, Any],
) -> Path:
    """`write` ``snap`` on replica 0 (None on the others) over ``groups[0]``, its outcome handed
    to every replica over ``groups[1]``; see [Note: one copy across replicas] in
    `pipeline.checkpoint.replicas`."""
    job = None if snap is None else functools.partial(write, snap, root, keep, groups[0], pipe)
    return agree(place(pipe), groups[1], job)


def start(
    pipe: Checkpointable, snap: Snapshot | None, root: Path, keep: int | None
) -> PendingCheckpoint:
    """`write_once` in the background, over the pipeline's own checkpoint groups."""
    groups = _GROUPS.get(pipe)
    if groups is None:
        groups = _GROUPS[pipe] = _checkpoint_groups(pipe)
    job = functools.partial(write_once, pipe, snap, root, keep, groups)
    pending = _PENDING[pipe] = PendingCheckpoint(job)
    return pending


def _checkpoint_groups(pipe: Checkpointable) -> tuple[Any, Any]:
    """Gloo groups of the pipeline's ranks and of its dp peers, for a save in the background
    (its collectives must not interleave with the training's on the pipeline's own groups)."""
    where = place(pipe)
    if where.dp == 1:  # the pipeline's ranks only, in the same order on each
        ranks = dist.get_process_group_ranks(pipe.group) if pipe.group is not None else None
        ranks = ranks or list(range(dist.get_world_size()))
        return dist.new_group(ranks, backend="gloo", use_local_synchronization=True), None
    mesh = pipe.replicas.mesh  # type: ignore[attr-defined]
    table = [[int(r) for r in row] for row in mesh.mesh.tolist()]
    if sum(map(len, table)) != dist.get_world_size():
        raise CheckpointError(
            "save_checkpoint_async of replicas on a mesh over part of the world is not "
            "supported (its groups are made by every rank of the world); use save_checkpoint"
        )
    me = dist.get_rank()
    mine: list[Any] = [None, None]
    for axis, lines in enumerate((table, [list(col) for col in zip(*table, strict=True)])):
        for line in lines:  # every rank makes every group, in the same order
            made = dist.new_group(line, backend="gloo")
            if me in line:
                mine[axis] = made
    return mine[0], mine[1]
