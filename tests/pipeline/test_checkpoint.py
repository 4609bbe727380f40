"""Checkpoints (`pipeline.checkpoint.save_load`): resume bit-identically in fresh processes, load under another
split, skip crashed saves, keep what retention must, export, refuse code and foreign models.

The model is small but has what makes resuming hard: dropout on (its masks come from each rank's
RNG), BatchNorm buffers, a weight tied across the first and last stage, Adam state and an LR
schedule; the data are shuffled (each step's batch drawn from a generator seeded by its position).
Every `run_ranks` call starts fresh processes, so a resume shares nothing with the run that saved.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from harness import run_ranks
from torch import nn

from partition.errors import CheckpointError
from pipeline.checkpoint.save_load import (
    export_checkpoint,
    latest_complete,
    prune_checkpoints,
    save_checkpoint_async,
)
from pipeline.runtime.pipeline import Pipeline, PipelineOptions

# --- models and data (module level: the ranks import them) ------------------------------------


class Block(nn.Module):
    def __init__(self, width: int, p: float) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(F.gelu(self.fc(x)))


class DropNet(nn.Module):
    """Embedding, 4 residual blocks with dropout, BatchNorm, an LM head tied to the embedding."""

    def __init__(self, vocab: int = 24, width: int = 16, depth: int = 4, p: float = 0.25) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.Sequential(*[Block(width, p) for _ in range(depth)])
        self.norm = nn.BatchNorm1d(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, vocab)
        return self.head(self.norm(self.blocks(self.embed(idx))))


class OtherNet(nn.Module):
    """Another model taking the same input: its checkpoint is foreign to `DropNet`."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(24, 8)
        self.out = nn.Linear(8, 24)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.table(idx)))


BATCH, MICROBATCHES = 8, 4


def dropnet(p: float = 0.25, width: int = 16, dtype: str = "float32") -> Any:
    model = DropNet(p=p, width=width).to(getattr(torch, dtype))
    return model, (torch.zeros(BATCH, dtype=torch.long),), F.cross_entropy


def othernet() -> Any:
    return OtherNet(), (torch.zeros(BATCH, dtype=torch.long),), F.cross_entropy


def batch(position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch at a data position: shuffled data, reproducible from the position alone."""
    g = torch.Generator().manual_seed(10_000 + position)
    return torch.randint(0, 24, (BATCH,), generator=g), torch.randint(0, 24, (BATCH,), generator=g)


class Evil:
    """Unpickling this runs a shell command (what a checkpoint must never do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


# --- on the ranks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """Train up to data position ``total``, saving after the positions in ``save_at``."""

    total: int
    roots: tuple[tuple[str, int | None], ...] = ()
    """(root, keep) pairs every save goes to; a resume reads the first root."""
    save_at: tuple[int, ...] = ()
    resume: bool = False
    p: float = 0.25
    schedule: str = "1f1b"
    virtual: int = 1
    dtype: str = "float32"
    asynchronous: bool = False
    model: Any = field(default=None)

    def pipeline(self) -> Pipeline:
        return Pipeline(
            self.model or functools.partial(dropnet, self.p, 16, self.dtype),
            options=PipelineOptions(
                schedule=self.schedule, microbatches=MICROBATCHES, virtual=self.virtual
            ),
            optimizer_factory=functools.partial(torch.optim.Adam, lr=1e-2),
            lr_scheduler_factory=functools.partial(
                torch.optim.lr_scheduler.StepLR, step_size=4, gamma=0.5
            ),
        )


def snapshot(pipe: Pipeline) -> dict[str, Any]:
    """Parameters and buffers by name, Adam's state by parameter name, the learning rate."""
    out: dict[str, Any] = {k: v.detach().clone() for k, v in pipe.state_dict().items()}
    if pipe.optimizer is None:  # a stage without parameters
        return out
    for name, p in pipe.named_parameters().items():
        for k, v in pipe.optimizer.state.get(p, {}).items():
            out[f"optim:{name}:{k}"] = v.clone()
    out["lr"] = pipe.optimizer.param_groups[0]["lr"]
    return out


def _train(run: Run) -> dict[str, Any]:
    torch.manual_seed(100 + dist.get_rank())
    pipe = run.pipeline()
    start, loaded, info = 0, None, None
    if run.resume:
        got = pipe.load(run.roots[0][0])
        start, loaded = got.data_position, snapshot(pipe)
        info = (got.step, got.data_position, got.extra, got.rng_restored, pipe.steps_done)
    losses, saved, pending = {}, {}, []
    for position in range(start, run.total):
        loss = pipe.step(*batch(position))
        losses[position] = None if loss is None else loss.item()
        if position + 1 in run.save_at:
            for root, keep in run.roots:
                kw: Any = {"data_position": position + 1, "extra": {"seen": position + 1}}
                if run.asynchronous:  # training goes on while it writes
                    pending.append(save_checkpoint_async(pipe, root, keep=keep, **kw))
                else:
                    pipe.save(root, keep=keep, **kw)
            saved[position + 1] = snapshot(pipe)
    for p in pending:
        p.wait()
    return {
        "losses": losses,
        "final": snapshot(pipe),
        "loaded": loaded,
        "saved": saved,
        "info": info,
    }


def _merged(ranks: list[dict[str, Any]], what: str, *key: Any) -> dict[str, Any]:
    """One rank-independent view: every rank's tensors by name (a tied copy is bit-equal)."""
    out: dict[str, Any] = {}
    for r in ranks:
        value = r[what]
        for k in key:
            value = value[k]
        for name, v in value.items():
            if name in out and isinstance(v, torch.Tensor):  # held by two ranks: one value
                assert torch.equal(out[name], v), f"{what}: the ranks' copies of {name} differ"
            out[name] = v
    return out


def _losses(ranks: list[dict[str, Any]]) -> dict[int, float]:
    return {k: v for r in ranks for k, v in r["losses"].items() if v is not None}


def _assert_equal(a: dict[str, Any], b: dict[str, Any], what: str) -> None:
    assert set(a) == set(b), f"{what}: names differ: {sorted(set(a) ^ set(b))}"
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), f"{what}: {k} differs"
        else:
            assert a[k] == b[k], f"{what}: {k}: {a[k]} != {b[k]}"


# --- resume ------------------------------------------------------------------------------------


@pytest.mark.timeout(240)
@pytest.mark.parametrize("asynchronous", [False, True])
def test_resume_in_fresh_processes_is_bit_identical(tmp_path: Path, asynchronous: bool) -> None:
    """6 steps straight == 3 steps, save, every process ended, fresh processes resume to 6:
    every parameter, buffer and Adam tensor `torch.equal`, the same loss at every step. The
    asynchronous save is written while step 4 already changes the tensors it copied."""
    root = str(tmp_path / "ckpt")
    straight = run_ranks(2, _train, Run(total=6), timeout=200)
    run = Run(
        total=3 + asynchronous, roots=((root, None),), save_at=(3,), asynchronous=asynchronous
    )
    first = run_ranks(2, _train, run, timeout=200)
    if asynchronous:  # step 4 ran in the process that saved: not part of the comparison
        for r in first:
            r["losses"].pop(3)
    second = run_ranks(2, _train, Run(total=6, roots=((root, None),), resume=True), timeout=200)

    assert all(r["info"] == (3, 3, {"seen": 3}, True, 3) for r in second)
    _assert_equal(_merged(second, "loaded"), _merged(first, "saved", 3), "state right after load")
    _assert_equal(_merged(second, "final"), _merged(straight, "final"), "state after 6 steps")
    assert {**_losses(first), **_losses(second)} == _losses(straight)
    assert len(_losses(straight)) == 6
    # the test has teeth: dropout draws differ per step, so an unrestored RNG would change losses
    assert len(set(_losses(straight).values())) == 6


# --- another split -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split_source(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Saved after 2 steps under 2 stages; and the uninterrupted 4-step run in one process.
    Dropout off (another split draws other masks) and float64 (another split sums in another
    order, and Adam magnifies an fp32 rounding difference to 1e-5 within 4 steps)."""
    root = str(tmp_path_factory.mktemp("split") / "ckpt")
    run = Run(total=2, roots=((root, None),), save_at=(2,), p=0.0, dtype="float64")
    saved = run_ranks(2, _train, run)
    reference = run_ranks(1, _train, Run(total=4, p=0.0, dtype="float64"), timeout=200)
    return {"root": root, "saved": _merged(saved, "saved", 2), "reference": reference}


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("world", "schedule", "virtual"),
    [(1, "1f1b", 1), (3, "1f1b", 1), (4, "gpipe", 1), (2, "interleaved", 2)],
)
def test_loads_under_another_split_and_schedule(
    split_source: dict[str, Any], world: int, schedule: str, virtual: int
) -> None:
    run = Run(
        total=4,
        roots=((split_source["root"], None),),
        resume=True,
        p=0.0,
        schedule=schedule,
        virtual=virtual,
        dtype="float64",
    )
    ranks = run_ranks(world, _train, run, timeout=200)
    # the state each rank reads is exactly what the 2 ranks saved, names and optimizer included
    _assert_equal(_merged(ranks, "loaded"), split_source["saved"], f"{world} ranks, loaded")
    assert all(r["info"][:3] == (2, 2, {"seen": 2}) for r in ranks)
    assert all(r["info"][3] == (world == 2) for r in ranks)  # RNG: only under the saved world
    # training goes on as if uninterrupted (another split sums in another order: allclose)
    reference = split_source["reference"]
    final, want = _merged(ranks, "final"), _merged(reference, "final")
    assert set(final) == set(want)
    for k, v in final.items():
        if isinstance(v, torch.Tensor):
            assert torch.allclose(v, want[k], rtol=1e-10, atol=1e-12), k
        else:  # the learning rate, which the LR schedule halved after step 4
            assert v == want[k] == 5e-3, k
    ours, theirs = _losses(ranks), _losses(reference)
    assert ours == pytest.approx({k: theirs[k] for k in (2, 3)}, rel=1e-12)


# --- crashes, retention, export ------------------------------------------------------------------


@pytest.fixture(scope="module")
def saves(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A save after each of 5 steps (2 ranks) into ``all`` (kept) and ``kept2`` (keep=2)."""
    base = tmp_path_factory.mktemp("saves")
    every, kept = str(base / "all"), str(base / "kept2")
    run = Run(total=5, roots=((every, None), (kept, 2)), save_at=(1, 2, 3, 4, 5))
    ranks = run_ranks(2, _train, run, timeout=200)
    return {
        "all": Path(every),
        "kept2": Path(kept),
        "saved": {s: _merged(ranks, "saved", s) for s in range(1, 6)},
    }


def _copy(saves: dict[str, Any], tmp_path: Path) -> Path:
    root = tmp_path / "ckpt"
    shutil.copytree(saves["all"], root)
    return root


def _rehash(checkpoint: Path, name: str) -> None:
    """Update the manifest for a changed file, as someone who can write the directory could."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    data = (checkpoint / name).read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def test_retention_keeps_the_newest(saves: dict[str, Any]) -> None:
    kept = sorted(p.name for p in saves["kept2"].iterdir())
    assert kept == [".lock", "step-00000004", "step-00000005"]  # .lock: the saving job's


def test_a_crashed_or_damaged_save_is_skipped_and_named(
    saves: dict[str, Any], tmp_path: Path
) -> None:
    root = _copy(saves, tmp_path)
    step = {s: root / f"step-{s:08d}" for s in range(1, 6)}
    shutil.copytree(step[2], root / ".tmp-step-00000006")  # killed before publishing
    part = step[5] / "tensors" / "__1_0.distcp"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit flipped
    part.write_bytes(bytes(data))
    truncated = step[4] / "tensors" / "__0_0.distcp"
    truncated.write_bytes(truncated.read_bytes()[:100])
    (step[3] / "manifest.json").unlink()  # killed after its parts, before the manifest

    found, skipped = latest_complete(root)
    assert found == step[2]
    reasons = dict(skipped)
    assert list(reasons) == [root / ".tmp-step-00000006", step[5], step[4], step[3]]
    assert "not published" in reasons[root / ".tmp-step-00000006"]
    assert "tensors/__1_0.distcp fails its checksum" in reasons[step[5]]
    assert "tensors/__0_0.distcp is truncated" in reasons[step[4]]
    assert "no manifest.json" in reasons[step[3]]
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp fails its checksum"):
        export_checkpoint(step[5], tmp_path / "x.safetensors")

    # retention never deletes the only complete checkpoint, nor anything newer than it
    assert prune_checkpoints(root, keep=3) == []  # fewer than 3 complete: nothing goes
    assert prune_checkpoints(root, keep=1) == [step[1]]
    assert sorted(p.name for p in root.iterdir()) == [
        ".lock",
        ".tmp-step-00000006",
        *(f"step-{s:08d}" for s in range(2, 6)),
    ]
    assert latest_complete(root)[0] == step[2]


def test_export_loads_into_the_model_and_the_pipeline(
    saves: dict[str, Any], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    out = export_checkpoint(saves["all"] / "step-00000002", tmp_path / "model.safetensors")
    model = DropNet()
    model.load_state_dict(load_file(str(out)), strict=True)
    want = {k: v for k, v in saves["saved"][2].items() if ":" not in k and k != "lr"}
    _assert_equal({k: v.detach() for k, v in model.state_dict().items()}, want, "exported")
    # the same file as a Pipeline's per-stage checkpoint, on 2 ranks
    ranks = run_ranks(2, _loaded_from_file, str(out), timeout=120)
    _assert_equal(_merged(ranks, "state"), want, "Pipeline(checkpoint=exported)")


def _loaded_from_file(path: str) -> dict[str, Any]:
    pipe = Pipeline(dropnet, options=PipelineOptions(microbatches=MICROBATCHES, checkpoint=path))
    return {"state": {k: v.detach().clone() for k, v in pipe.state_dict().items()}}


# --- refusals: code in a file, names that escape, another model --------------------------------


def _plant(checkpoint: Path, name: str, evil: bytes) -> None:
    """Put ``evil`` where the file ``name`` is read from: the whole index, or every tensor record
    of a part (at the offsets DCP's index gives, the file's size unchanged)."""
    from pipeline.checkpoint.store import _IndexUnpickler

    target = checkpoint / name
    if name.endswith(".metadata"):
        target.write_bytes(evil)
    else:
        with open(checkpoint / "tensors" / ".metadata", "rb") as f:
            index = _IndexUnpickler(f).load()
        data = bytearray(target.read_bytes())
        for info in index.storage_data.values():
            if info.relative_path == target.name:
                assert info.length >= len(evil)
                data[info.offset : info.offset + len(evil)] = evil
        target.write_bytes(bytes(data))
    _rehash(checkpoint, name)


def test_code_in_a_file_never_runs(saves: dict[str, Any], tmp_path: Path) -> None:
    """A pickle that would run ``touch`` is planted as a tensor part and as DCP's index, with the
    manifest's checksums updated to match: both are refused and nothing runs."""
    marker = tmp_path / "marker"
    evil = pickle.dumps(Evil(marker), protocol=2)
    for name, refusal in [
        (
            "tensors/__0_0.distcp",
            r"reading its tensors failed: rank 0: UnpicklingError: torch\.load\(weights_only=True\) "
            r"refused a tensor record: .*GLOBAL posix\.system",
        ),
        ("tensors/.metadata", r"refusing to load posix\.system"),
    ]:
        root = tmp_path / name.replace("/", "_")
        shutil.copytree(saves["all"] / "step-00000002", root / "step-00000002")
        _plant(root / "step-00000002", name, evil)
        assert latest_complete(root)[0] == root / "step-00000002"  # checksums alone pass it
        with pytest.raises(CheckpointError, match=refusal):
            export_checkpoint(root, tmp_path / "out.safetensors")
        errors = run_ranks(2, _load_errors, [(str(root), "dropnet")], timeout=120)
        assert all(e[0] and "CheckpointError" in e[0] for e in errors), errors
        assert not marker.exists()
    assert not marker.exists()


def test_names_that_escape_the_directory_are_refused(saves: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "evil").write_bytes(b"outside")
    for bad in ["../evil", str(tmp_path / "evil")]:
        root = tmp_path / f"root{len(bad)}"
        checkpoint = root / "step-00000002"
        shutil.copytree(saves["all"] / "step-00000002", checkpoint)
        manifest = json.loads((checkpoint / "manifest.json").read_text())
        manifest["files"][bad] = {"sha256": hashlib.sha256(b"outside").hexdigest(), "bytes": 7}
        (checkpoint / "manifest.json").write_text(json.dumps(manifest))
        found, skipped = latest_complete(root)
        assert found is None and f"refusing the file name {bad!r}" in skipped[0][1]
        with pytest.raises(CheckpointError, match="outside the checkpoint"):
            export_checkpoint(checkpoint, tmp_path / "out.safetensors")

    # DCP's own index naming a file outside: refused before DCP reads anything
    from pipeline.checkpoint.store import _IndexUnpickler

    checkpoint = tmp_path / "index" / "step-00000002"
    shutil.copytree(saves["all"] / "step-00000002", checkpoint)
    with open(checkpoint / "tensors" / ".metadata", "rb") as f:
        index = _IndexUnpickler(f).load()
    for info in index.storage_data.values():
        info.relative_path = "../../evil"
    (checkpoint / "tensors" / ".metadata").write_bytes(pickle.dumps(index))
    _rehash(checkpoint, "tensors/.metadata")
    with pytest.raises(CheckpointError, match=r"'\.\./\.\./evil', which is outside"):
        export_checkpoint(checkpoint, tmp_path / "out.safetensors")


def _load_errors(cases: list[tuple[str, str]]) -> list[str | None]:
    """Try each load; the error each gives (on every rank, before any collective, or this
    would hang), or ``None``."""
    models = {
        "dropnet": dropnet,
        "othernet": othernet,
        "wide": functools.partial(dropnet, 0.25, 24),
    }
    errors: list[str | None] = []
    for path, model in cases:
        pipe = Run(total=0, model=models[model]).pipeline()
        try:
            pipe.load(path)
            errors.append(None)
        except CheckpointError as e:
            errors.append(f"{type(e).__name__}: {e}")
        dist.barrier()
    return errors


def test_a_foreign_checkpoint_or_another_shape_is_refused_by_name(saves: dict[str, Any]) -> None:
    root = str(saves["all"])
    cases = [(root, "othernet"), (root, "wide"), (root, "dropnet")]
    for foreign, shape, fine in run_ranks(2, _load_errors, cases, timeout=120):
        assert foreign is not None and "another model: DropNet" in foreign
        assert "this pipeline runs OtherNet" in foreign
        assert shape is not None and "tensor 'blocks.0.fc.bias'" in shape
        assert "shape (16,) in the checkpoint" in shape and "shape (24,) in this model" in shape
        assert fine is None


def _save_errors(blocked_root: str, good_root: str) -> list[str]:
    """Saves that must fail on every rank (or this would hang), then one that must work."""
    pipe = Run(total=0).pipeline()
    errors = []
    for kwargs in [
        {"root": blocked_root},  # its parent is a file: rank 0 cannot create the directory
        {"root": good_root, "extra": {"when": object()}},  # not JSON
        {"root": good_root, "keep": 0},
    ]:
        try:
            pipe.save(**kwargs)
            errors.append("")
        except CheckpointError as e:
            errors.append(str(e))
    pipe.save(good_root)
    return errors


def test_a_failed_save_is_raised_on_every_rank(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    blocked, good = str(tmp_path / "file" / "ckpt"), str(tmp_path / "good")
    for errors in run_ranks(2, _save_errors, blocked, good, timeout=120):
        assert "preparing the checkpoint failed on rank 0: cannot create" in errors[0]
        assert "extra= must be a JSON-serialisable dict" in errors[1]
        assert "keep must be at least 1" in errors[2]
    assert latest_complete(good)[0] == Path(good) / "step-00000000"
    assert not (tmp_path / "file").is_dir()


def _save_on_a_full_disk(root: str) -> tuple[str, list[str]]:
    """Rank 1's disk is full (ENOSPC) while it writes its part: the save fails on every rank,
    and then one that works."""
    import pipeline.checkpoint.write as write_module

    pipe = Run(total=0).pipeline()
    real = write_module.write_json

    def full(path: Path, data: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    write_module.write_json = full if dist.get_rank() == 1 else real  # type: ignore[assignment]
    try:
        pipe.save(root)
        error = ""
    except CheckpointError as e:
        error = str(e)
    dist.barrier()
    left = sorted(p.name for p in Path(root).iterdir())
    dist.barrier()  # every rank has looked before rank 0 starts the next save
    write_module.write_json = real
    pipe.save(root)
    return error, left


@pytest.mark.slow
def test_a_save_that_fills_the_disk_leaves_nothing_behind(tmp_path: Path) -> None:
    """Issue 22: a save failing for ENOSPC left ``.tmp-step-N``, so the disk stayed full and the
    next ``--resume`` failed at the same save."""
    root = tmp_path / "ckpt"
    for error, left in run_ranks(2, _save_on_a_full_disk, str(root), timeout=120):
        assert "failed on rank 1: OSError: [Errno 28] No space left on device" in error
        assert left == [".lock"]  # every rank's files gone with the .tmp- folder
    assert latest_complete(root) == (root / "step-00000000", [])
