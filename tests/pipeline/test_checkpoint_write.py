"""Writing a checkpoint (`pipeline.checkpoint.write`) on one process: a rank's snapshot (live or
copied), the write and its atomic publish (a ``.tmp-`` folder renamed once complete), retention,
a part that cannot be written, and the save in a background thread.

One gloo rank in this process (the ``one_rank`` fixture) runs the collectives; the "pipeline"
is a stand-in (`_Pipe`) with two real stages on that rank, a weight tied across them, SGD with
momentum and a StepLR schedule. What is written is read back with DCP's own reader, ``hashlib``
and ``json``, not with `pipeline.checkpoint.save_load`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn

import pipeline.checkpoint.write as write_module
from partition.errors import CheckpointError
from pipeline.checkpoint.store import latest_complete
from pipeline.checkpoint.write import (
    PendingCheckpoint,
    Snapshot,
    snapshot,
    start,
    wait_pending,
    write,
)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.fc = nn.Linear(3, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight


def _holder(**children: nn.Module) -> nn.Module:
    module = nn.Module()
    for name, child in children.items():
        module.add_module(name, child)
    return module


@dataclass(eq=False)
class _Pipe:
    """What a checkpoint reads of a pipeline (`Checkpointable`): here two stages of 3 and 2
    nodes, both on rank 0 of 1, a weight tied across them, one SGD step taken."""

    model: Net = field(default_factory=Net)
    rank: int = 0
    world_size: int = 1
    group: Any = None
    my_stages: tuple[int, ...] = (0, 1)
    num_microbatches: int = 2
    plan: Any = None
    model_class: str = "Net"
    steps_done: int = 5

    def __post_init__(self) -> None:
        m = self.model
        self.stages = [
            SimpleNamespace(module=_holder(embed=m.embed, fc=m.fc), nodes=["embed", "fc", "relu"]),
            SimpleNamespace(module=_holder(head=m.head), nodes=["head", "output"]),
        ]
        self.schedule = SimpleNamespace(name="1f1b", stage_to_rank=lambda s: 0)
        self.tied = SimpleNamespace(shared=[])
        self.optimizer = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        self.lr_scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=2)
        for p in m.parameters():
            p.grad = torch.ones_like(p)
        self.optimizer.step()
        self.lr_scheduler.step()


META = {"data_position": 7, "extra": {"epoch": 1}}
MODEL_KEYS = {"model/embed.weight", "model/fc.weight", "model/fc.bias"}
OPTIM_KEYS = {k.replace("model/", "optim/") + "/momentum_buffer" for k in MODEL_KEYS}


def _values(pipe: _Pipe) -> dict[str, Tensor]:
    """What a checkpoint of ``pipe`` must hold now, read off the model and optimizer directly."""
    m, opt = pipe.model, pipe.optimizer
    out = {f"model/{n}": p.detach().clone() for n, p in m.named_parameters()}
    for n, p in m.named_parameters():
        out[f"optim/{n}/momentum_buffer"] = opt.state[p]["momentum_buffer"].clone()
    return out


def _read_back(folder: Path, want: dict[str, Tensor]) -> dict[str, Tensor]:
    """The tensors ``want`` names, read from ``folder`` with DCP's own reader."""
    state = {k: torch.empty_like(v) for k, v in want.items()}
    dcp.load(state, storage_reader=dcp.FileSystemReader(folder / "tensors"))
    return state


def _assert_holds(folder: Path, want: dict[str, Tensor]) -> None:
    got = _read_back(folder, want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _entry(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


# --- the snapshot -------------------------------------------------------------------------------


def test_a_snapshot_names_every_tensor_and_describes_the_split() -> None:
    pipe = _Pipe()
    snap = snapshot(pipe, META, copy_tensors=False)
    assert set(snap.tensors) == MODEL_KEYS | OPTIM_KEYS | {"rng/0/cpu"}  # head.weight is tied
    assert (snap.rank, snap.world) == (0, 1)
    part = snap.part
    assert part["rank"] == 0 and part["stages"] == [0, 1]
    assert part["aliases"] == {"embed.weight": ["embed.weight", "head.weight"]}
    assert part["optimizer"]["class"] == "SGD"
    assert part["scheduler"]["step_size"] == 2 and part["scheduler"]["last_epoch"] == 1
    manifest = snap.manifest
    assert {k: manifest[k] for k in ("format", "version", "step", "data_position", "extra")} == {
        "format": "pipepart-checkpoint",
        "version": 1,
        "step": 5,
        "data_position": 7,
        "extra": {"epoch": 1},
    }
    assert manifest["world_size"] == 1 and manifest["schedule"] == "1f1b"
    assert manifest["microbatches"] == 2 and manifest["plan"] is None
    assert manifest["stage_bounds"] == [0, 3, 5] and manifest["stage_ranks"] == [0, 0]
    assert manifest["model"]["class_name"] == "Net"
    assert set(manifest["model"]["tensors"]) == {
        "embed.weight",
        "fc.weight",
        "fc.bias",
        "head.weight",
    }
    assert "files" not in manifest  # the write adds them


def test_a_live_snapshot_shares_the_tensors_a_copied_one_does_not() -> None:
    pipe = _Pipe()
    before = _values(pipe)
    live = snapshot(pipe, META, copy_tensors=False)
    copied = snapshot(pipe, META, copy_tensors=True)
    weight = pipe.model.fc.weight
    assert live.tensors["model/fc.weight"].data_ptr() == weight.data_ptr()
    assert copied.tensors["model/fc.weight"].data_ptr() != weight.data_ptr()

    with torch.no_grad():  # training goes on
        for p in pipe.model.parameters():
            p.add_(1.0)
    for state in pipe.optimizer.state.values():
        state["momentum_buffer"].mul_(2.0)
    pipe.lr_scheduler.base_lrs[0] = 99.0

    for k, v in before.items():
        assert torch.equal(copied.tensors[k], v), k
        assert not torch.equal(live.tensors[k], v), k
    assert copied.part["scheduler"]["base_lrs"] == [0.1]


# --- write and publish --------------------------------------------------------------------------


def test_write_publishes_a_folder_whose_manifest_lists_every_file(
    one_rank: None, tmp_path: Path
) -> None:
    pipe = _Pipe()
    want = _values(pipe)
    snap = snapshot(pipe, META, copy_tensors=False)
    final = write(snap, tmp_path, None, None)
    assert final == tmp_path / "step-00000005"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000005"]  # no .tmp- left
    on_disk = {p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file()}
    assert on_disk == {
        "manifest.json",
        "rank-00000.json",
        "rank-00000.sha256",
        "tensors/.metadata",
        "tensors/__0_0.distcp",
    }
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["files"] == {name: _entry(final / name) for name in on_disk - {"manifest.json"}}
    sums = json.loads((final / "rank-00000.sha256").read_text())
    assert sums == {n: e for n, e in manifest["files"].items() if not n.endswith(".sha256")}
    assert {k: v for k, v in manifest.items() if k != "files"} == snap.manifest
    assert json.loads((final / "rank-00000.json").read_text()) == json.loads(json.dumps(snap.part))
    _assert_holds(final, want | {"rng/0/cpu": snap.tensors["rng/0/cpu"]})
    assert latest_complete(tmp_path) == (final, [])


def test_the_folder_is_renamed_only_once_everything_is_in_it(
    one_rank: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}
    real = write_module.publish

    def watching(tmp: Path, final: Path, manifest: dict[str, Any]) -> None:
        seen["tmp"] = tmp
        seen["files"] = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        seen["final exists"] = final.exists()
        real(tmp, final, manifest)

    monkeypatch.setattr(write_module, "publish", watching)
    final = write(snapshot(_Pipe(), META, copy_tensors=False), tmp_path, None, None)
    assert seen["tmp"] == tmp_path / ".tmp-step-00000005"
    assert seen["files"] == [  # every rank's files, no manifest yet
        "rank-00000.json",
        "rank-00000.sha256",
        "tensors/.metadata",
        "tensors/__0_0.distcp",
    ]
    assert seen["final exists"] is False
    assert not seen["tmp"].exists() and (final / "manifest.json").is_file()


def test_a_crashed_save_of_the_step_is_cleared_and_a_same_step_save_replaced(
    one_rank: None, tmp_path: Path
) -> None:
    leftover = tmp_path / ".tmp-step-00000005"
    (leftover / "tensors").mkdir(parents=True)
    (leftover / "tensors" / "__7_0.distcp").write_bytes(b"from a crashed save of 8 ranks")
    pipe = _Pipe()
    first = write(snapshot(pipe, META, copy_tensors=False), tmp_path, None, None)
    assert not (first / "tensors" / "__7_0.distcp").exists()

    with torch.no_grad():
        pipe.model.fc.bias.fill_(3.0)
    again = write(snapshot(pipe, META, copy_tensors=False), tmp_path, None, None)
    assert again == first and sorted(p.name for p in tmp_path.iterdir()) == ["step-00000005"]
    _assert_holds(again, {"model/fc.bias": torch.full((3,), 3.0)})
    assert latest_complete(tmp_path) == (again, [])


def test_keep_deletes_all_but_the_newest(one_rank: None, tmp_path: Path) -> None:
    pipe = _Pipe()
    for step in (1, 2, 3):
        pipe.steps_done = step
        write(snapshot(pipe, META, copy_tensors=False), tmp_path, 2, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000003"]


def test_a_part_that_cannot_be_written_publishes_nothing(one_rank: None, tmp_path: Path) -> None:
    snap = snapshot(_Pipe(), META, copy_tensors=False)
    snap.part["scheduler"] = {"when": object()}  # not JSON
    with pytest.raises(CheckpointError, match="failed on rank 0: TypeError: Object of type object"):
        write(snap, tmp_path, None, None)
    assert not (tmp_path / "step-00000005").exists()
    assert list(tmp_path.iterdir()) == []  # the .tmp- folder is removed too (issue 22)
    assert latest_complete(tmp_path) == (None, [])


def test_a_full_disk_leaves_no_temporary_folder_behind(
    one_rank: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 22: a save failing for ENOSPC left ``.tmp-step-N``, so the disk stayed full."""

    def full(path: Path, data: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(write_module, "write_json", full)
    with pytest.raises(CheckpointError, match=r"failed on rank 0: OSError: \[Errno 28\] No space"):
        write(snapshot(_Pipe(), META, copy_tensors=False), tmp_path, None, None)
    assert list(tmp_path.iterdir()) == []


def test_nonfinite_weights_are_never_published_and_keep_spares_the_finite_ones(
    one_rank: None, tmp_path: Path
) -> None:
    pipe = _Pipe()
    good = write(snapshot(pipe, META, copy_tensors=False), tmp_path, 1, None)
    with torch.no_grad():
        pipe.model.fc.bias[1] = float("nan")
    pipe.steps_done = 6
    with pytest.raises(CheckpointError) as refused:
        write(snapshot(pipe, META, copy_tensors=False), tmp_path, 1, None)
    assert (
        f"preparing the checkpoint failed on rank 0: not saving {tmp_path / 'step-00000006'}: "
        "1 weight tensor(s) are not finite, the first 'fc.bias'"
    ) in str(refused.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name]  # kept, nothing else
    assert latest_complete(tmp_path) == (good, [])


# --- in the background --------------------------------------------------------------------------


def test_an_async_save_writes_the_state_of_when_it_started(
    one_rank: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write is held until training has changed every tensor in place: what is saved is
    still the state at the snapshot."""
    go = threading.Event()
    real = write_module.write

    def held(snap: Snapshot, root: Path, keep: int | None, group: Any, owner: object) -> Path:
        assert go.wait(30)
        return real(snap, root, keep, group, owner)

    monkeypatch.setattr(write_module, "write", held)
    pipe = _Pipe()
    want = _values(pipe)
    pending = start(pipe, snapshot(pipe, META, copy_tensors=True), tmp_path, None)
    assert not pending.done()
    with torch.no_grad():
        for p in pipe.model.parameters():
            p.mul_(-1.0)
    for state in pipe.optimizer.state.values():
        state["momentum_buffer"].zero_()
    go.set()
    final = pending.wait()
    assert pending.done() and pending.reported
    assert final == tmp_path / "step-00000005" and latest_complete(tmp_path) == (final, [])
    _assert_holds(final, want)
    wait_pending(pipe)  # reported already: nothing more to do


def _failing(error: BaseException) -> Any:
    def fail(snap: Snapshot, root: Path, keep: int | None, group: Any, owner: object) -> Path:
        raise error

    return fail


def test_an_async_failure_is_raised_by_wait(
    one_rank: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snap = snapshot(_Pipe(), META, copy_tensors=True)
    monkeypatch.setattr(write_module, "write", _failing(RuntimeError("disk on fire")))
    pending = PendingCheckpoint(lambda: write_module.write(snap, tmp_path, None, None, None))
    with pytest.raises(CheckpointError, match="the background save failed: disk on fire") as e:
        pending.wait()
    assert isinstance(e.value.__cause__, RuntimeError)
    mine = CheckpointError("writing failed on rank 1")
    monkeypatch.setattr(write_module, "write", _failing(mine))
    with pytest.raises(CheckpointError) as e:
        PendingCheckpoint(lambda: write_module.write(snap, tmp_path, None, None, None)).wait()
    assert e.value is mine  # a CheckpointError as it was raised


def test_an_unreported_failure_is_raised_by_the_next_save_or_load(
    one_rank: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = _Pipe()
    monkeypatch.setattr(write_module, "write", _failing(CheckpointError("rank 0 ran out")))
    start(pipe, snapshot(pipe, META, copy_tensors=True), tmp_path, None)
    with pytest.raises(CheckpointError, match="rank 0 ran out"):
        wait_pending(pipe)
    wait_pending(pipe)  # raised once: the pipeline is free again
