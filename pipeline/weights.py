"""Where a stage's weights come from: the model the factory builds, a checkpoint, or init rules.

[Note: the model's own weights]
A rank holds only its stages, built on ``meta`` and then allocated (``to_empty``). Their values
must be, bit for bit, those of the model the user's factory builds when called the plain way —
``torch.manual_seed(seed); model_fn()`` in one process on the CPU — every parameter and every
buffer, persistent or not, including what the factory itself loads (``load_state_dict``) or sets
in ``__init__``. No per-tensor rule can reproduce that (see ``shared/design/weights.md``), so by
default (``weights="factory"``, or ``"auto"`` when the model fits in host memory) the model is
built for real **once per machine** — by the launcher, or by the lowest rank of each machine —
and written to a temporary safetensors file from which every rank reads only its own tensors
(`TensorFile`, one tensor at a time, memory-mapped). A machine therefore holds one full copy
for the time it takes to load, never one per rank.

A model too large for host memory (``weights="init"``) is initialised per module by the model's
own rules (`partition.materialize.initialize`): values that depend on the seed and the names
only, not the factory's. A checkpoint (``checkpoint=``) supplies what it holds; a tensor it lacks
(a non-persistent buffer such as a rotary ``inv_freq``) comes from the factory's model or the
rules. Whatever the sources, every tensor must end up written: `unwritten` finds what none wrote
(floating-point tensors are filled with NaN after ``to_empty``; others are tracked by their
version counters), and `Materialized.check` makes that an error naming the tensors and the ways
out — uninitialised memory never reaches training.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from partition.errors import CheckpointError, InputError

__all__ = [
    "Materialized",
    "TensorFile",
    "WeightsMode",
    "all_tensors",
    "build_eager",
    "describe_sources",
    "fill",
    "fits_in_host",
    "model_bytes",
    "save_tensors",
    "share_factory_weights",
]

WeightsMode = Literal["auto", "factory", "init"]
"""See [Note: the model's own weights]."""

_ALIASES = "pipepart.aliases"


def build_eager(model_fn: Callable[[], Any], seed: int) -> Any:
    """``model_fn()`` called the plain way, after ``torch.manual_seed(seed)``, on the CPU.

    The caller's random state is left as it was (the build runs under ``fork_rng``).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_fn()


def all_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer (persistent or not) by every name it has."""
    tensors: dict[str, Tensor] = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    return tensors


def model_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers, each tensor once (works on meta)."""
    seen = {id(t): t for t in all_tensors(module).values()}
    return sum(t.numel() * t.element_size() for t in seen.values())


def _available_host_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def fits_in_host(nbytes: int) -> bool:
    """Whether building the whole model once (plus each rank's share of it) fits in host memory."""
    available = _available_host_bytes()
    return available is None or 2 * nbytes <= 0.8 * available


def save_tensors(module: nn.Module, path: str | Path) -> None:
    """Write every tensor of ``module`` (`all_tensors`) to a safetensors file.

    A tensor known under several names (a tied weight) is written once; the other names are
    recorded as aliases in the file's metadata and resolved by `TensorFile`.
    """
    from safetensors.torch import save_file

    canonical: dict[int, str] = {}
    aliases: dict[str, str] = {}
    out: dict[str, Tensor] = {}
    storages: set[int] = set()
    for name, tensor in all_tensors(module).items():
        if tensor.device.type == "meta":
            raise InputError(
                f"the model factory left {name!r} on the meta device; it cannot be written"
            )
        if id(tensor) in canonical:
            aliases[name] = canonical[id(tensor)]
            continue
        canonical[id(tensor)] = name
        t = tensor.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages:  # a view of a tensor already written: safetensors wants its own
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        out[name] = t
    save_file(out, str(path), metadata={_ALIASES: json.dumps(aliases)})


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


class TensorFile:
    """A tensor file read one tensor at a time: safetensors or a ``torch.save`` state_dict.

    A safetensors file is read with plain reads straight into the tensor that receives it (no
    memory map, so a rank's resident memory grows by its own tensors only); the aliases
    `save_tensors` records are resolved. A ``torch.save`` file is opened with ``mmap=True`` and
    ``weights_only=True``: no code from the file runs.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"no checkpoint or weights file at {self.path}")
        self.aliases: dict[str, str] = {}
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        self._state: dict[str, Tensor] = {}
        self._handle: Any = None
        if self.path.suffix == ".safetensors":
            self._open_safetensors()
        else:
            try:
                state = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:
                raise CheckpointError(
                    f"{self.path} is not a tensors-only torch.save file ({type(e).__name__}: "
                    f"{e}); save a state_dict, or a .safetensors file"
                ) from e
            if not isinstance(state, dict):
                raise CheckpointError(
                    f"{self.path} holds a {type(state).__name__}, not a state_dict"
                )
            self._state = {k: v for k, v in state.items() if isinstance(v, Tensor)}
        self.names = set(self._entries) | set(self._state) | set(self.aliases)

    def _open_safetensors(self) -> None:
        self._handle = open(self.path, "rb")  # noqa: SIM115 (closed in __exit__)
        try:
            (length,) = struct.unpack("<Q", self._handle.read(8))
            header = json.loads(self._handle.read(length))
        except (struct.error, ValueError) as e:
            raise CheckpointError(f"{self.path} is not a safetensors file: {e}") from e
        meta = header.pop("__metadata__", None) or {}
        self.aliases = json.loads(meta.get(_ALIASES, "{}"))
        start = 8 + length
        for name, entry in header.items():
            dtype = _DTYPES.get(entry["dtype"])
            if dtype is None:
                raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {entry['dtype']}")
            begin, end = entry["data_offsets"]
            self._entries[name] = (dtype, tuple(entry["shape"]), start + begin, end - begin)
        size = self.path.stat().st_size
        end = max((o + n for _, _, o, n in self._entries.values()), default=start)
        if size < end:
            raise CheckpointError(
                f"{self.path} is truncated: its header describes {end} bytes, the file has {size}"
            )

    def shape(self, name: str) -> tuple[int, ...]:
        key = self.aliases.get(name, name)
        if key in self._entries:
            return self._entries[key][1]
        return tuple(self._state[key].shape)

    def get(self, name: str) -> Tensor:
        """The tensor ``name`` (a new CPU tensor)."""
        key = self.aliases.get(name, name)
        if key not in self._entries:
            return self._state[key]
        dtype, shape, _, _ = self._entries[key]
        out = torch.empty(shape, dtype=dtype)
        self._read(key, out)
        return out

    def copy_to(self, name: str, target: Tensor) -> None:
        """Write tensor ``name`` into ``target`` (same shape), reading straight into it when it
        is a contiguous CPU tensor of the file's dtype."""
        key = self.aliases.get(name, name)
        entry = self._entries.get(key)
        if (
            entry is not None
            and entry[0] == target.dtype
            and target.device.type == "cpu"
            and (target.is_contiguous())
        ):
            self._read(key, target)
        else:
            target.copy_(self.get(name).to(dtype=target.dtype))

    def _read(self, key: str, out: Tensor) -> None:
        _, _, offset, nbytes = self._entries[key]
        if not nbytes:
            return
        self._handle.seek(offset)
        view = memoryview(cast(Any, out.detach().view(-1).view(torch.uint8).numpy()))
        if self._handle.readinto(view) != nbytes:
            raise CheckpointError(f"{self.path} is truncated: tensor {key!r} is incomplete")

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle, self._state = None, {}


# --- what every rank's stages hold -----------------------------------------------------------


@dataclass
class Materialized:
    """The tensors of some modules just allocated by ``to_empty``, and which source wrote each."""

    modules: Sequence[nn.Module]
    sources: dict[str, str] = field(default_factory=dict)
    """Tensor name -> the source that wrote it (``factory``, ``checkpoint``, ``init``)."""

    def __post_init__(self) -> None:
        self._versions: dict[str, int] = {}
        with torch.no_grad():
            for name, t in self.tensors().items():
                if t.is_floating_point() or t.is_complex():
                    t.fill_(float("nan"))  # so that an unwritten tensor is visible
                self._versions[name] = t._version

    def tensors(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for module in self.modules:
            out.update(all_tensors(module))
        return out

    def missing(self) -> list[str]:
        """Names no source has claimed yet."""
        return [n for n in self.tensors() if n not in self.sources]

    def load(self, file: TensorFile, source: str, names: Iterator[str] | None = None) -> int:
        """Copy from ``file`` every tensor not yet written that it holds; returns how many."""
        tensors = self.tensors()
        wanted = list(names) if names is not None else self.missing()
        count = 0
        with torch.no_grad():
            for name in wanted:
                if name in self.sources or name not in file.names:
                    continue
                target, shape = tensors[name], file.shape(name)
                if shape != tuple(target.shape):
                    raise CheckpointError(
                        f"{file.path}: tensor {name!r} has shape {shape}, the model "
                        f"expects {tuple(target.shape)}"
                    )
                file.copy_to(name, target)
                self.sources[name] = source
                count += 1
        return count

    def claim_written(self, source: str) -> int:
        """Mark as written by ``source`` every unclaimed tensor that something wrote since
        allocation (an init rule); returns how many."""
        count = 0
        for name, t in self.tensors().items():
            if name in self.sources or name in _unwritten({name: t}, self._versions):
                continue
            self.sources[name] = source
            count += 1
        return count

    def check(self, hint: str) -> None:
        """Raise `CheckpointError` naming every tensor no source wrote; see the module note."""
        left = self.missing()
        if left:
            shown = ", ".join(repr(n) for n in left[:8])
            more = f" and {len(left) - 8} more" if len(left) > 8 else ""
            raise CheckpointError(
                f"{len(left)} tensor(s) of this rank's stages were written by no source: "
                f"{shown}{more}. {hint}"
            )


def _unwritten(tensors: dict[str, Tensor], versions: dict[str, int]) -> list[str]:
    out = []
    for name, t in tensors.items():
        if t.is_floating_point() or t.is_complex():
            if bool(torch.isnan(t).any()):
                out.append(name)
        elif t._version == versions.get(name):
            out.append(name)
    return out


# --- one build per machine --------------------------------------------------------------------


def _machine() -> str:
    """What identifies this machine among the ranks: torchrun's node rank, else the host name."""
    return os.environ.get("GROUP_RANK") or socket.gethostname()


@contextlib.contextmanager
def share_factory_weights(
    model_fn: Callable[[], Any],
    seed: int,
    unpack: Callable[[Any], nn.Module],
    group: dist.ProcessGroup | None = None,
) -> Iterator[TensorFile]:
    """Build the model once per machine and yield its tensors to every rank of ``group``.

    The lowest rank of each machine builds it (`build_eager`) and writes it to a temporary file
    (`save_tensors`); on leaving the block, once every rank has read what it needs, the file is
    deleted. A collective: every rank of ``group`` calls it. A failure to build is raised on every
    rank, naming the rank where it happened (no rank is left waiting).
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    machines: list[Any] = [None] * world
    dist.all_gather_object(machines, _machine(), group=group)
    leader = min(r for r in range(world) if machines[r] == machines[rank])
    path: str | None = None
    error = ""
    if rank == leader:
        try:
            model = unpack(build_eager(model_fn, seed))
            fd, path = tempfile.mkstemp(prefix="pipepart-weights-", suffix=".safetensors")
            os.close(fd)
            save_tensors(model, path)
            del model
        except Exception as e:  # reported on every rank below
            error = f"{type(e).__name__}: {e}"
    outcomes: list[Any] = [None] * world
    dist.all_gather_object(outcomes, (path, error), group=group)
    failed = [(r, err) for r, (_, err) in enumerate(outcomes) if err]
    if failed:
        if path is not None:
            Path(path).unlink(missing_ok=True)
        r, err = failed[0]
        raise InputError(f"building the model's weights with its factory failed on rank {r}: {err}")
    mine = outcomes[leader][0]
    problem = ""
    try:
        with TensorFile(mine) as file:
            yield file
    except Exception as e:
        problem = f"{type(e).__name__}: {e}"
        raise
    finally:
        done: list[Any] = [None] * world
        dist.all_gather_object(done, problem, group=group)  # everyone has read its tensors
        if rank == leader and path is not None:
            Path(path).unlink(missing_ok=True)
    bad = [(r, p) for r, p in enumerate(done) if p]
    if bad:
        raise CheckpointError(f"rank {bad[0][0]} could not load its weights: {bad[0][1]}")


# --- filling a rank's stages ------------------------------------------------------------------

_WAYS_OUT = (
    "Give a checkpoint holding them (checkpoint=..., --checkpoint), or let the factory build the "
    "model (weights='factory', --weights factory: needs host memory for one copy per machine)."
)


def fill(
    allocated: Materialized,
    *,
    model_fn: Callable[[], Any],
    meta_model: nn.Module,
    unpack: Callable[[Any], nn.Module],
    mode: WeightsMode,
    seed: int,
    checkpoint: str | Path | None = None,
    factory_weights: str | Path | None = None,
    group: dist.ProcessGroup | None = None,
) -> None:
    """Write every tensor of ``allocated``; see [Note: the model's own weights].

    Order: the checkpoint (which must hold every persistent tensor of the stages), then for the
    rest the factory's model (``factory_weights`` if the launcher wrote it, else one build per
    machine) or, with ``mode="init"``, the model's init rules. A collective when the factory's
    model is built here: every rank of ``group`` calls it.

    Raises:
        CheckpointError: the checkpoint lacks a persistent tensor or has another shape, or a
            tensor is left unwritten (named, with the ways out).
    """
    file = TensorFile(checkpoint) if checkpoint is not None else None
    covered: set[str] = set()
    if file is not None:
        # persistence from the model itself: a stage module registers every buffer it copies
        saved = set(meta_model.state_dict(keep_vars=True))
        persistent = [k for k in allocated.tensors() if k in saved]
        lacking = [k for k in persistent if k not in file.names]
        if lacking:
            raise CheckpointError(
                f"{file.path} lacks {len(lacking)} tensor(s) this rank's stages need, e.g. "
                f"{lacking[:3]}; the checkpoint must be a whole-model state_dict with the "
                "model's own key names"
            )
        covered = file.names
    rest = [n for n in allocated.tensors() if n not in covered]
    use_factory = factory_weights is not None
    if not use_factory and mode != "init" and _agree(bool(rest), group, any):
        wanted = mode == "factory" or fits_in_host(model_bytes(meta_model))
        use_factory = _agree(wanted, group, all)
    if not use_factory and rest:  # the rules first: a checkpoint then overwrites what it holds
        from partition.materialize import initialize

        hook = getattr(meta_model, "_init_weights", None)
        for module in allocated.modules:
            initialize(module, seed=seed, init_hook=hook, model=meta_model)
    if file is not None:
        with file:
            allocated.load(file, "checkpoint")
    if use_factory and factory_weights is not None:
        with TensorFile(factory_weights) as factory_file:
            allocated.load(factory_file, "factory")
    elif use_factory:
        with share_factory_weights(model_fn, seed, unpack, group) as factory_file:
            allocated.load(factory_file, "factory")
    else:
        allocated.claim_written("init")
    allocated.check(_WAYS_OUT)


def _agree(value: bool, group: dist.ProcessGroup | None, how: Callable[[Any], bool]) -> bool:
    """``how`` (``any`` / ``all``) of every rank's ``value``: one answer on every rank."""
    if not dist.is_initialized():
        return value
    values: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(values, value, group=group)
    return how(values)


def describe_sources(allocated: Materialized) -> str:
    """``"factory (12 tensors), checkpoint (3)"``: where this rank's tensors came from."""
    counts: dict[str, int] = {}
    for source in allocated.sources.values():
        counts[source] = counts.get(source, 0) + 1
    return ", ".join(f"{s} ({n} tensors)" for s, n in sorted(counts.items())) or "no tensors"
