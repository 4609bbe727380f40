"""Checkpoint directories on disk: the manifest and checksums, which ones are complete, retention,
and DCP's index read without running code. `pipeline.checkpoint.save_load` writes and reads what is inside.

[Note: complete or absent]
A save writes everything into ``ROOT/.tmp-step-N/``. Each rank hashes what it wrote; after every
rank reported (a gather, so that one rank's failure is raised on all), rank 0 writes
``manifest.json`` and renames the directory to ``step-N`` (`publish`: one ``os.replace``, atomic
on one filesystem). A directory is *complete* only with a valid manifest for its step whose every
file exists with its size and sha256 (`problem`): `latest_complete` takes the newest such and
says why it skipped each newer one. `prune_checkpoints` (``keep=K``) deletes only what is older
than the K newest complete checkpoints, so never the only complete one, nor a newer partial one.
Verifying reads every file (sha256 runs at about 1 GB/s on one core).

[Note: nothing from a file runs]
DCP (``torch.distributed.checkpoint``) cannot promise this on its own: its ``.metadata`` index is
a pickle, and it loads non-tensor values with ``torch.load(weights_only=False)``. So the index is
read here by an unpickler that builds DCP's metadata classes, torch sizes, layouts and dtypes and
refuses anything else (`read_index`); an index naming a non-tensor item is refused (pipepart puts
only tensors in DCP, everything else in JSON); DCP reads each tensor with
``torch.load(weights_only=True)``. A file name in the manifest or the index that is absolute,
holds ``..`` or resolves outside the checkpoint (a symbolic link) is refused (`inside`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import warnings
from collections.abc import Collection
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.api import CheckpointException

from partition.errors import CheckpointError

__all__ = ["latest_complete", "prune_checkpoints"]

log = logging.getLogger(__name__)

FORMAT, VERSION = "pipepart-checkpoint", 1
MANIFEST, TENSORS, TMP = "manifest.json", "tensors", ".tmp-"
_MODEL_KEYS = ("class_name", "model_hash", "tensors")


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def part_name(rank: int) -> str:
    """Rank ``rank``'s JSON part."""
    return f"rank-{rank:05d}.json"


def step_of(name: str) -> int | None:
    """The step of a ``step-N`` or ``.tmp-step-N`` directory name, else ``None``."""
    stem = name.removeprefix(TMP)
    digits = stem.removeprefix("step-")
    return int(digits) if stem.startswith("step-") and digits.isdigit() else None


def inside(directory: Path, name: str) -> Path:
    """``directory / name``, refusing a name that escapes it; see [Note: nothing from a file runs]."""
    pure = PurePosixPath(name)
    target = directory / name
    if (
        not name
        or pure.is_absolute()
        or "\\" in name
        or ".." in pure.parts
        or not target.resolve().is_relative_to(directory.resolve())
    ):
        raise CheckpointError(
            f"{directory}: refusing the file name {name!r}, which is outside the checkpoint"
        )
    return target


def file_entry(path: Path) -> dict[str, Any]:
    """``{"sha256": ..., "bytes": ...}`` of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON and flush it to the disk."""
    with open(path, "w") as f:
        f.write(json.dumps(data, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read as JSON: {e}") from e


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` into ``tmp``, then rename ``tmp`` to ``final`` (replacing a
    checkpoint of the same step); see [Note: complete or absent]."""
    write_json(tmp / MANIFEST, manifest)
    _fsync_dir(tmp)
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def problem(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint (naming the file), or ``None`` if it is."""
    if path.name.startswith(TMP):
        return "not published: a save still running, or one that stopped before its manifest"
    if not (path / MANIFEST).is_file():
        return f"no {MANIFEST}: the save did not finish"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"{MANIFEST} is not valid JSON ({e})"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return f"{MANIFEST} is not a {FORMAT} manifest"
    if manifest.get("version") != VERSION:
        return f"{MANIFEST} has format version {manifest.get('version')}; this pipepart reads {VERSION}"
    if manifest.get("step") != step_of(path.name):
        return f"{MANIFEST} is for step {manifest.get('step')}, but the directory is {path.name}"
    files, world, model = manifest.get("files"), manifest.get("world_size"), manifest.get("model")
    if not isinstance(files, dict) or not isinstance(world, int) or not 1 <= world <= len(files):
        return f"{MANIFEST} lacks its files or a world size they fit"
    if not isinstance(model, dict) or not all(k in model for k in _MODEL_KEYS):
        return f"{MANIFEST} lacks the model's identity ({', '.join(_MODEL_KEYS)})"
    if not isinstance(manifest.get("data_position"), int) or not isinstance(
        manifest.get("extra"), dict
    ):
        return f"{MANIFEST} lacks the data position or the caller's extra"
    for name in [f"{TENSORS}/.metadata", *(part_name(r) for r in range(world))]:
        if name not in files:
            return f"{MANIFEST} lists no {name}"
    for name, want in files.items():
        try:
            file = inside(path, name)
        except CheckpointError as e:
            return str(e)
        if not isinstance(want, dict):
            return f"{MANIFEST} has no checksum for {name}"
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != want.get("bytes"):
            return f"{name} is truncated or overwritten: {size} bytes, the manifest says {want.get('bytes')}"
        got = file_entry(file)["sha256"]
        if got != want.get("sha256"):
            return f"{name} fails its checksum: sha256 {got[:16]}…, the manifest says {str(want.get('sha256'))[:16]}…"
    return None


def _checkpoints(root: Path) -> list[tuple[int, Path]]:
    """``step-N`` and ``.tmp-step-N`` directories under ``root``, newest first (published first)."""
    if not root.is_dir():
        return []
    found = [(s, p) for p in root.iterdir() if p.is_dir() and (s := step_of(p.name)) is not None]
    return sorted(found, key=lambda sp: (sp[0], not sp[1].name.startswith(TMP)), reverse=True)


def latest_complete(root: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint under ``root`` (``None`` if there is none), and every newer
    directory it skipped with the reason; see [Note: complete or absent]."""
    skipped: list[tuple[Path, str]] = []
    for _, path in _checkpoints(Path(root)):
        why = problem(path)
        if why is None:
            return path, skipped
        skipped.append((path, why))
    return None, skipped


def prune_checkpoints(
    root: str | Path, keep: int, *, known_complete: Collection[Path] = ()
) -> list[Path]:
    """Delete every checkpoint directory (complete or not, published or not) older than the
    ``keep`` newest complete ones; nothing when fewer are complete. Returns what it deleted.

    ``known_complete`` are counted without being read again (what this process published)."""
    if keep < 1:
        raise CheckpointError(f"keep must be at least 1, got {keep}")
    complete, oldest, deleted = 0, -1, []
    for step, path in _checkpoints(Path(root)):
        if complete >= keep:
            if step < oldest:
                shutil.rmtree(path, ignore_errors=True)
                deleted.append(path)
        elif path in known_complete or problem(path) is None:
            complete, oldest = complete + 1, step
    return deleted


def resolve(path: Path) -> tuple[Path, list[tuple[Path, str]]]:
    """A complete checkpoint from a ``step-N`` directory or a root (its newest complete one),
    and what was skipped; `CheckpointError` saying why when there is none."""
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    if (path / MANIFEST).exists() or step_of(path.name) is not None:
        why = problem(path)
        if why is not None:
            raise CheckpointError(f"{path} is not a complete checkpoint: {why}")
        return path, []
    found, skipped = latest_complete(path)
    if found is None:
        why = "; ".join(f"{p.name}: {r}" for p, r in skipped) or "it holds no step-N directory"
        raise CheckpointError(f"no complete checkpoint under {path} ({why})")
    for p, reason in skipped:
        log.warning("skipping checkpoint %s: %s", p, reason)
    return found, skipped


# --- DCP's index, read without running code ----------------------------------------------------

_INDEX_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
}  # fmt: skip
"""What a DCP ``.metadata`` pickle is made of (and torch's dtypes)."""


class _IndexUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes, sizes, layouts and dtypes, and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _INDEX_CLASSES.get(module, ()) or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise CheckpointError(
            f"refusing to load {module}.{name}: a DCP index never holds it, so the file would "
            "run code"
        )


def read_index(path: Path, manifest: dict[str, Any]) -> Any:
    """DCP's metadata of checkpoint ``path``, checked: tensors only, files inside and listed."""
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    where = path / TENSORS / ".metadata"
    try:
        with open(where, "rb") as f:
            index = _IndexUnpickler(f).load()
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from e
    except Exception as e:
        raise CheckpointError(f"{where} is not a DCP index ({type(e).__name__}: {e})") from e
    if not isinstance(index, Metadata):
        raise CheckpointError(f"{where} holds a {type(index).__name__}, not DCP metadata")
    for key, md in index.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointError(f"{where}: {key!r} is not a tensor; refusing to unpickle it")
    for info in (index.storage_data or {}).values():
        inside(path / TENSORS, str(info.relative_path))
        if f"{TENSORS}/{info.relative_path}" not in manifest["files"]:
            raise CheckpointError(
                f"{where} names {info.relative_path!r}, which {MANIFEST} does not list"
            )
    return index


class _Reader(dcp.FileSystemReader):
    """DCP's file reader, given the index `read_index` checked (so that it unpickles none)."""

    def __init__(self, path: Path, index: Any) -> None:
        super().__init__(path)
        self._index = index

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(self._index, "storage_meta", None) is None:
            self._index.storage_meta = StorageMeta()
        self._index.storage_meta.load_id = self.load_id
        return self._index


def load_tensors(
    state: dict[str, Tensor], path: Path, index: Any, group: Any, *, no_dist: bool = False
) -> None:
    """Read the tensors ``state`` names (in place) through DCP: a collective over ``group``
    unless ``no_dist``. Any failure is a `CheckpointError` (DCP raises it on every rank)."""
    try:
        with warnings.catch_warnings():  # "assuming ... a single process": it is, by request
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load(
                state,
                storage_reader=_Reader(path / TENSORS, index),
                process_group=group,
                no_dist=no_dist,
            )
    except (Exception, CheckpointException) as e:  # DCP's is a BaseException
        raise CheckpointError(f"{path}: reading its tensors failed: {dcp_failure(e)}") from e


def dcp_failure(error: BaseException) -> str:
    """One line per failed rank of a DCP error (whose text is every rank's traceback)."""
    failures = getattr(error, "failures", None) if isinstance(error, CheckpointException) else None
    if not failures:
        return _one_line(error)
    parts = []
    for rank, failure in sorted(failures.items()):
        exc = failure[0] if isinstance(failure, tuple) else failure
        parts.append(f"rank {rank}: {_one_line(exc)}")
    return "; ".join(parts)


def _one_line(error: BaseException) -> str:
    paragraphs = [p.strip() for p in str(error).split("\n\n") if p.strip()]
    text = paragraphs[0].splitlines()[0] if paragraphs else ""
    if text.startswith("Weights only load failed") and len(paragraphs) > 1:
        rest = "\n".join(paragraphs[1:])
        detail = rest.partition("WeightsUnpickler error:")[2].strip() or rest
        text = f"torch.load(weights_only=True) refused a tensor record: {detail.splitlines()[0]}"
    return f"{type(error).__name__}: {text}"
