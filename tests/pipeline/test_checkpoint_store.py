"""Checkpoint folders on disk (`pipeline.checkpoint.store`), on ``tmp_path`` with no process:
the names, the manifest and its checksums, which folders count as complete and why the others
do not, retention, publishing, names that escape, and DCP's index read without running code.

Checkpoints here are written by hand (`_checkpoint`): their files hold arbitrary bytes, their
manifest the sha256 that ``hashlib`` gives. What a real save writes, and loading it, is
`tests/pipeline/test_checkpoint.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import pipeline.checkpoint.store as store
from partition.errors import CheckpointError
from pipeline.checkpoint.store import (
    dcp_failure,
    file_entry,
    inside,
    latest_complete,
    load_tensors,
    part_name,
    problem,
    prune_checkpoints,
    publish,
    read_index,
    read_json,
    resolve,
    step_name,
    step_of,
    write_json,
)

# --- a checkpoint by hand -----------------------------------------------------------------------


def _entry(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _manifest(step: int, files: dict[str, bytes], world: int = 1) -> dict[str, Any]:
    return {
        "format": "pipepart-checkpoint",
        "version": 1,
        "step": step,
        "world_size": world,
        "files": {name: _entry(data) for name, data in files.items()},
        "model": {"class_name": "Net", "model_hash": "0" * 16, "tensors": {}},
        "data_position": step,
        "extra": {},
    }


def _checkpoint(root: Path, step: int, *, world: int = 1, name: str | None = None) -> Path:
    """A complete checkpoint ``root/step-N`` (or ``root/name``): an index, a tensor file and a
    JSON part per rank, and a manifest with their sizes and sha256."""
    path = root / (name or f"step-{step:08d}")
    files = {"tensors/.metadata": b"an index", "tensors/__0_0.distcp": b"tensors of step %d" % step}
    files |= {f"rank-{r:05d}.json": b'{"rank": %d}' % r for r in range(world)}
    for file, data in files.items():
        (path / file).parent.mkdir(parents=True, exist_ok=True)
        (path / file).write_bytes(data)
    (path / "manifest.json").write_text(json.dumps(_manifest(step, files, world)))
    return path


def _partial(root: Path, step: int, *, tmp: bool = False) -> Path:
    """A save that stopped before its manifest (published or not)."""
    path = _checkpoint(root, step, name=f".tmp-step-{step:08d}" if tmp else None)
    (path / "manifest.json").unlink()
    return path


def _edit(path: Path, change: Callable[[dict[str, Any]], object]) -> None:
    """Change the manifest in place (what ``change`` returns is ignored)."""
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def _listing(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


# --- names --------------------------------------------------------------------------------------


def test_step_and_part_names_sort_as_numbers() -> None:
    assert step_name(12) == "step-00000012" and part_name(3) == "rank-00003.json"
    names = [step_name(s) for s in (9, 10, 100, 2)]
    assert sorted(names) == [step_name(s) for s in (2, 9, 10, 100)]  # zero-padded: text order


@pytest.mark.parametrize(
    ("name", "step"),
    [
        ("step-00000012", 12),
        (".tmp-step-00000012", 12),
        ("step-7", 7),
        ("step-", None),
        ("step-12a", None),
        ("step--1", None),
        ("steps-00000012", None),
        (".old-step-00000012", None),  # what publish moves aside: never a checkpoint
        ("rank-00000.json", None),
    ],
)
def test_step_of_reads_only_checkpoint_folder_names(name: str, step: int | None) -> None:
    assert step_of(name) == step


# --- names that escape --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tensors/__0_0.distcp", "rank-00000.json", "a/b/c"])
def test_inside_accepts_a_relative_name_below_the_folder(tmp_path: Path, name: str) -> None:
    assert inside(tmp_path, name) == tmp_path / name


@pytest.mark.parametrize(
    "name", ["", "../evil", "tensors/../../evil", "a/../b", "/etc/passwd", "tensors\\..\\evil"]
)
def test_inside_refuses_absolute_names_dot_dot_and_backslashes(tmp_path: Path, name: str) -> None:
    with pytest.raises(CheckpointError, match="outside the checkpoint") as caught:
        inside(tmp_path, name)
    assert repr(name) in str(caught.value) and str(tmp_path) in str(caught.value)


def test_inside_refuses_a_symbolic_link_out_of_the_folder(tmp_path: Path) -> None:
    folder, outside = tmp_path / "ckpt", tmp_path / "outside"
    folder.mkdir()
    outside.write_bytes(b"not yours")
    (folder / "link").symlink_to(outside)
    (folder / "here").write_bytes(b"mine")
    (folder / "inner").symlink_to(folder / "here")
    with pytest.raises(CheckpointError, match="'link', which is outside"):
        inside(folder, "link")
    assert inside(folder, "inner") == folder / "inner"  # a link that stays inside is fine


# --- files, checksums, JSON ---------------------------------------------------------------------


def test_file_entry_is_sha256_and_size_also_past_one_read(tmp_path: Path) -> None:
    data = torch.randint(0, 256, ((5 << 20) // 2,), dtype=torch.uint8).numpy().tobytes()
    for size in (0, 1, 1 << 20, len(data)):  # empty, tiny, one chunk exactly, 2.5 chunks
        (tmp_path / "f").write_bytes(data[:size])
        assert file_entry(tmp_path / "f") == _entry(data[:size])


def test_json_round_trip_and_unreadable_json_names_the_file(tmp_path: Path) -> None:
    value = {"step": 3, "files": {"a": [1, 2.5, None, True]}, "text": "é"}
    write_json(tmp_path / "x.json", value)
    assert json.loads((tmp_path / "x.json").read_text()) == value == read_json(tmp_path / "x.json")
    (tmp_path / "bad.json").write_text('{"step": ')
    with pytest.raises(CheckpointError, match=r"bad\.json cannot be read as JSON"):
        read_json(tmp_path / "bad.json")
    with pytest.raises(CheckpointError, match=r"missing\.json cannot be read as JSON"):
        read_json(tmp_path / "missing.json")


# --- publish ------------------------------------------------------------------------------------


def test_publish_writes_the_manifest_then_renames(tmp_path: Path) -> None:
    tmp = tmp_path / ".tmp-step-00000004"
    tmp.mkdir()
    (tmp / "part").write_bytes(b"new")
    manifest = {"step": 4, "files": {"part": _entry(b"new")}}
    publish(tmp, tmp_path / "step-00000004", manifest)
    assert _listing(tmp_path) == ["step-00000004"]
    final = tmp_path / "step-00000004"
    assert json.loads((final / "manifest.json").read_text()) == manifest
    assert (final / "part").read_bytes() == b"new"


def test_publish_replaces_a_checkpoint_of_the_same_step_leaving_nothing_aside(
    tmp_path: Path,
) -> None:
    final = tmp_path / "step-00000004"
    final.mkdir()
    (final / "stale").write_bytes(b"old")
    (tmp_path / ".old-step-00000004").mkdir()  # what a publish that crashed moved aside
    tmp = tmp_path / ".tmp-step-00000004"
    tmp.mkdir()
    (tmp / "part").write_bytes(b"new")
    publish(tmp, final, {"step": 4})
    assert _listing(tmp_path) == ["step-00000004"]
    assert _listing(final) == ["manifest.json", "part"]


# --- which folders are complete -----------------------------------------------------------------


def test_a_checkpoint_written_by_hand_is_complete(tmp_path: Path) -> None:
    assert problem(_checkpoint(tmp_path, 2)) is None
    assert problem(_checkpoint(tmp_path, 3, world=3)) is None


def _truncate(path: Path) -> None:
    f = path / "tensors/__0_0.distcp"
    f.write_bytes(f.read_bytes()[:3])


def _flip(path: Path) -> None:
    f = path / "tensors/__0_0.distcp"
    data = bytearray(f.read_bytes())
    data[0] ^= 1
    f.write_bytes(bytes(data))


def _escape(path: Path) -> None:
    (path.parent / "outside").write_bytes(b"outside")
    _edit(path, lambda m: m["files"].update({"../outside": _entry(b"outside")}))


def _link_out(path: Path) -> None:
    (path.parent / "outside").write_bytes(b"outside")
    (path / "tensors/link").symlink_to(path.parent / "outside")
    _edit(path, lambda m: m["files"].update({"tensors/link": _entry(b"outside")}))


def _set(key: str, value: Any) -> Callable[[Path], None]:
    return lambda path: _edit(path, lambda m: m.update({key: value}))


def _drop(key: str) -> Callable[[Path], None]:
    return lambda path: _edit(path, lambda m: m.pop(key))


def _drop_file(name: str) -> Callable[[Path], None]:
    return lambda path: _edit(path, lambda m: m["files"].pop(name))


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda p: (p / "manifest.json").unlink(), "no manifest.json: the save did not finish"),
        (lambda p: (p / "manifest.json").write_text('{"format": '), "is not valid JSON"),
        (lambda p: (p / "manifest.json").write_text("[]"), "is not a pipepart-checkpoint manifest"),
        (_set("format", "safetensors"), "is not a pipepart-checkpoint manifest"),
        (_set("version", 2), "has format version 2; this pipepart reads 1"),
        (_set("step", 3), "is for step 3, but the directory is step-00000002"),
        (_drop("step"), "is for step None"),
        (_set("world_size", 0), "lacks its files or a world size they fit"),
        (_set("world_size", 4), "lacks its files or a world size they fit"),  # 3 files listed
        (_set("world_size", "1"), "lacks its files or a world size they fit"),
        (_set("files", []), "lacks its files or a world size they fit"),
        (_set("world_size", 2), "lists no rank-00001.json"),
        (_set("model", {"class_name": "Net"}), "lacks the model's identity"),
        (_drop("data_position"), "lacks the data position or the caller's extra"),
        (_set("extra", []), "lacks the data position or the caller's extra"),
        (_drop_file("tensors/.metadata"), "lists no tensors/.metadata"),
        (_drop_file("rank-00000.json"), "lists no rank-00000.json"),
        (lambda p: (p / "tensors/__0_0.distcp").unlink(), "tensors/__0_0.distcp is missing"),
        (
            _truncate,
            "tensors/__0_0.distcp is truncated or overwritten: 3 bytes, the manifest says 17",
        ),
        (_flip, "tensors/__0_0.distcp fails its checksum"),
        (
            lambda p: _edit(p, lambda m: m["files"].update({"rank-00000.json": "abc"})),
            "has no checksum for rank-00000.json",
        ),
        (_escape, "refusing the file name '../outside'"),
        (_link_out, "refusing the file name 'tensors/link'"),
    ],
)
def test_problem_names_what_is_wrong(
    tmp_path: Path, damage: Callable[[Path], None], why: str
) -> None:
    path = _checkpoint(tmp_path / "root", 2)
    damage(path)
    found = problem(path)
    assert found is not None and why in found, found


def test_an_unpublished_folder_is_never_complete(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path, 5, name=".tmp-step-00000005")  # manifest and all: not renamed
    found = problem(path)
    assert found is not None and "not published" in found


# --- the newest complete one --------------------------------------------------------------------


def test_latest_complete_of_nothing(tmp_path: Path) -> None:
    assert latest_complete(tmp_path / "missing") == (None, [])
    assert latest_complete(tmp_path) == (None, [])


def test_latest_complete_skips_newer_broken_folders_newest_first(tmp_path: Path) -> None:
    for step in (1, 2):
        _checkpoint(tmp_path, step)
    three = _partial(tmp_path, 3)
    four = _partial(tmp_path, 4, tmp=True)
    five = _checkpoint(tmp_path, 5)
    _flip(five)
    # what is not a checkpoint folder is not looked at
    (tmp_path / "step-00000009").write_bytes(b"a file, not a folder")
    (tmp_path / "notes").mkdir()
    (tmp_path / ".old-step-00000008").mkdir()

    found, skipped = latest_complete(tmp_path)
    assert found == tmp_path / "step-00000002"
    assert [p for p, _ in skipped] == [five, four, three]
    assert "tensors/__0_0.distcp fails its checksum" in skipped[0][1]
    assert "not published" in skipped[1][1]
    assert "no manifest.json" in skipped[2][1]


def test_of_one_step_the_published_folder_is_read_before_the_unpublished(tmp_path: Path) -> None:
    tmp = _checkpoint(tmp_path, 6, name=".tmp-step-00000006")
    final = _checkpoint(tmp_path, 6)
    assert latest_complete(tmp_path) == (final, [])
    _flip(final)
    _checkpoint(tmp_path, 1)
    found, skipped = latest_complete(tmp_path)
    assert found == tmp_path / "step-00000001" and [p for p, _ in skipped] == [final, tmp]


def test_resolve_takes_a_folder_or_a_root_and_says_why_not(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        resolve(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"\(it holds no step-N directory\)"):
        resolve(tmp_path / "empty")
    root = tmp_path / "root"
    one, two = _checkpoint(root, 1), _partial(root, 2)
    assert resolve(root) == (one, [(two, "no manifest.json: the save did not finish")])
    assert resolve(one) == (one, [])
    with pytest.raises(CheckpointError, match="step-00000002 is not a complete checkpoint: no man"):
        resolve(two)
    _flip(one)
    with pytest.raises(
        CheckpointError, match=r"no complete checkpoint under .*step-00000001: .*checksum"
    ):
        resolve(root)


# --- retention ----------------------------------------------------------------------------------


def test_retention_keeps_the_newest_complete_and_what_is_newer(tmp_path: Path) -> None:
    """Complete 1, 3, 5; partial 0, 2, 4, 6 (6 unpublished). keep=2 keeps 3 and 5, and every
    folder newer than 3, complete or not; it deletes 2, 1 and 0 (newest first)."""
    for step in (1, 3, 5):
        _checkpoint(tmp_path, step)
    for step in (0, 2, 4):
        _partial(tmp_path, step)
    _partial(tmp_path, 6, tmp=True)
    deleted = prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in deleted] == ["step-00000002", "step-00000001", "step-00000000"]
    assert _listing(tmp_path) == [
        ".tmp-step-00000006",
        "step-00000003",
        "step-00000004",
        "step-00000005",
    ]


def test_retention_never_deletes_the_only_complete_checkpoint(tmp_path: Path) -> None:
    _partial(tmp_path, 0)
    _checkpoint(tmp_path, 1)
    for step in (2, 3, 4):  # more newer partial ones than keep
        _partial(tmp_path, step)
    before = _listing(tmp_path)
    for keep in (2, 5):  # fewer complete than keep: nothing goes
        assert prune_checkpoints(tmp_path, keep=keep) == []
    assert _listing(tmp_path) == before
    assert prune_checkpoints(tmp_path, keep=1) == [tmp_path / "step-00000000"]
    assert latest_complete(tmp_path)[0] == tmp_path / "step-00000001"


def test_retention_of_a_step_keeps_its_unpublished_twin(tmp_path: Path) -> None:
    _checkpoint(tmp_path, 1)
    _checkpoint(tmp_path, 2)
    _partial(tmp_path, 2, tmp=True)
    _partial(tmp_path, 1, tmp=True)
    assert sorted(p.name for p in prune_checkpoints(tmp_path, keep=1)) == [
        ".tmp-step-00000001",
        "step-00000001",
    ]
    assert _listing(tmp_path) == [".tmp-step-00000002", "step-00000002"]


def test_retention_counts_what_is_known_complete_without_reading_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for step in (1, 2):
        _checkpoint(tmp_path, step)
    three = _partial(tmp_path, 3)  # not complete on disk: counted only because we say so
    read: list[Path] = []

    def recording(path: Path) -> str | None:
        read.append(path)
        return problem(path)

    monkeypatch.setattr(store, "problem", recording)
    deleted = prune_checkpoints(tmp_path, keep=2, known_complete={three})
    assert [p.name for p in deleted] == ["step-00000001"]
    assert read == [tmp_path / "step-00000002"]  # three was not read, one not once two counted


@pytest.mark.parametrize("keep", [0, -1])
def test_retention_refuses_keeping_nothing(tmp_path: Path, keep: int) -> None:
    _checkpoint(tmp_path, 1)
    with pytest.raises(CheckpointError, match=f"keep must be at least 1, got {keep}"):
        prune_checkpoints(tmp_path, keep=keep)
    assert _listing(tmp_path) == ["step-00000001"]


def test_retention_of_a_missing_root_deletes_nothing(tmp_path: Path) -> None:
    assert prune_checkpoints(tmp_path / "missing", keep=1) == []


# --- DCP's index, read without running code -----------------------------------------------------


def _dcp(path: Path, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``state`` saved by DCP under ``path/tensors`` in this process; a manifest listing it."""
    (path / "tensors").mkdir(parents=True)
    with warnings.catch_warnings():  # "assuming ... a single process": yes
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, storage_writer=dcp.FileSystemWriter(path / "tensors"), no_dist=True)
    files = {f"tensors/{p.name}": _entry(p.read_bytes()) for p in (path / "tensors").iterdir()}
    return {"files": files}


def test_a_real_dcp_index_is_read_and_its_tensors_loaded(tmp_path: Path) -> None:
    saved = {"model/a": torch.arange(5.0), "model/b": torch.randn(2, 3, dtype=torch.float64)}
    manifest = _dcp(tmp_path, saved)
    index = read_index(tmp_path, manifest)
    md = index.state_dict_metadata
    assert set(md) == {"model/a", "model/b"}
    assert tuple(md["model/b"].size) == (2, 3) and md["model/b"].properties.dtype == torch.float64
    state = {"model/a": torch.zeros(5), "model/b": torch.zeros(2, 3, dtype=torch.float64)}
    load_tensors(state, tmp_path, index, None, no_dist=True)
    for k in saved:
        assert torch.equal(state[k], saved[k]), k
    with pytest.raises(
        CheckpointError, match=r"reading its tensors failed: rank 0: ValueError: Size"
    ):
        load_tensors({"model/a": torch.zeros(6)}, tmp_path, index, None, no_dist=True)


def test_an_index_naming_a_file_the_manifest_lacks_is_refused(tmp_path: Path) -> None:
    manifest = _dcp(tmp_path, {"model/a": torch.ones(2)})
    del manifest["files"]["tensors/__0_0.distcp"]
    with pytest.raises(
        CheckpointError, match=r"names '__0_0\.distcp', which manifest\.json does not"
    ):
        read_index(tmp_path, manifest)


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (pickle.dumps(OrderedDict(a=1)), "refusing to load collections.OrderedDict"),
        (pickle.dumps(os.getcwd), "refusing to load posix.getcwd"),
        (pickle.dumps({"model/a": 1}), "holds a dict, not DCP metadata"),
        (pickle.dumps(torch.Size([2, 3])), "holds a Size, not DCP metadata"),
        (b"not a pickle", "is not a DCP index"),
    ],
)
def test_an_index_that_is_not_dcp_metadata_is_refused(
    tmp_path: Path, content: bytes, why: str
) -> None:
    manifest = _dcp(tmp_path, {"model/a": torch.ones(2)})
    (tmp_path / "tensors/.metadata").write_bytes(content)
    with pytest.raises(CheckpointError, match=why):
        read_index(tmp_path, manifest)


def test_dcp_failures_are_one_line_per_rank() -> None:
    failures: dict[int, Any] = {
        1: (ValueError("bad shape\nsecond line\n\nTraceback..."), "traceback"),
        0: KeyError("model/x"),
    }
    error = CheckpointException("every rank's traceback", failures)
    assert dcp_failure(error) == "rank 0: KeyError: 'model/x'; rank 1: ValueError: bad shape"
    assert dcp_failure(RuntimeError("first\nsecond")) == "RuntimeError: first"
    refused = pickle.UnpicklingError(
        "Weights only load failed. Re-running may help.\n\nPlease file an issue.\n\n"
        "WeightsUnpickler error: Unsupported global: GLOBAL posix.system\nmore"
    )
    assert dcp_failure(refused) == (
        "UnpicklingError: torch.load(weights_only=True) refused a tensor record: Unsupported "
        "global: GLOBAL posix.system"
    )
