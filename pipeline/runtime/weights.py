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
own rules (`pipeline.runtime.init.initialize`): values that depend on the seed and the names
only, not the factory's. A checkpoint (``checkpoint=``) supplies what it holds; a tensor it lacks
(a non-persistent buffer such as a rotary ``inv_freq``) comes from the factory's model or the
rules. Whatever the sources, every tensor must end up written: `unwritten` finds what none wrote
(floating-point tensors are filled with NaN after ``to_empty``; others are tracked by their
version counters), and `Materialized.check` makes that an error naming the tensors and the ways
out — uninitialised memory never reaches training.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from partition.errors import CheckpointError, FactoryError
from partition.models.registry import call_factory, factory_name, unpack_model
from pipeline.runtime.tensorfile import TensorFile, all_tensors, save_tensors

if TYPE_CHECKING:
    from pipeline.runtime.options import PipelineOptions

__all__ = [
    "Materialized",
    "allocate",
    "build_eager",
    "describe_sources",
    "fill",
    "fits_in_host",
    "init_order",
    "model_bytes",
    "share_factory_weights",
]

log = logging.getLogger(__name__)


def build_eager(model_fn: Callable[[], Any], seed: int) -> Any:
    """``model_fn()`` called the plain way, after ``torch.manual_seed(seed)``, on the CPU.

    The caller's random state is left as it was (the build runs under ``fork_rng``).

    Raises:
        FactoryError: the factory raised (also an instance of what it raised, which is the cause).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        how = (
            "it was called the plain way, for the model's own weights: "
            f"torch.manual_seed({seed}), then the factory on the CPU"
        )
        return call_factory(model_fn, factory_name(model_fn), how)


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
        for name in wanted:
            if name in self.sources or name not in file.names:
                continue
            file.load_into(name, tensors[name])
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
    model_fn: Callable[[], Any], seed: int, group: dist.ProcessGroup | None = None
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
            model = unpack_model(build_eager(model_fn, seed)).model
            fd, path = tempfile.mkstemp(prefix="pipepart-weights-", suffix=".safetensors")
            os.close(fd)
            save_tensors(model, path)
            del model
        except Exception as e:  # reported on every rank below
            log.exception("building the model's weights failed")
            error = str(e) if isinstance(e, FactoryError) else f"{type(e).__name__}: {e}"
    outcomes: list[Any] = [None] * world
    dist.all_gather_object(outcomes, (path, error), group=group)
    failed = [(r, err) for r, (_, err) in enumerate(outcomes) if err]
    if failed:
        if path is not None:
            Path(path).unlink(missing_ok=True)
        r, err = failed[0]
        raise FactoryError(f"on rank {r}, which logged its traceback: {err}")
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
    options: PipelineOptions,
    group: dist.ProcessGroup | None = None,
) -> None:
    """Write every tensor of ``allocated``; see [Note: the model's own weights].

    Order: the checkpoint (which must hold every persistent tensor of the stages), then for the
    rest the factory's model (``options.factory_weights`` if the launcher wrote it, else one
    build per machine) or, with ``options.weights="init"``, the model's init rules. A collective
    when the factory's model is built here: every rank of ``group`` calls it.

    Args:
        allocated: this rank's stages, just allocated (`allocate`).
        model_fn: the model factory, for the factory's model.
        meta_model: the whole model on meta: its persistent tensors and init rules.
        options: ``weights``, ``seed``, ``checkpoint`` and ``factory_weights`` say where the
            values come from.
        group: the pipeline's ranks (default: the world).

    Raises:
        CheckpointError: the checkpoint lacks a persistent tensor or has another shape, or a
            tensor is left unwritten (named, with the ways out).
    """
    seed, checkpoint, factory_weights = options.seed, options.checkpoint, options.factory_weights
    file = TensorFile(checkpoint) if checkpoint is not None else None
    covered: set[str] = set()
    if file is not None:
        # persistence from the model itself: a stage module registers every buffer it copies
        saved = set(meta_model.state_dict(keep_vars=True))
        try:
            file.require([k for k in allocated.tensors() if k in saved], "this rank's stages")
        except CheckpointError:
            file.__exit__()
            raise
        covered = file.names
    rest = [n for n in allocated.tensors() if n not in covered]
    use_factory = factory_weights is not None
    if not use_factory and options.weights != "init" and _agree(bool(rest), group, any):
        wanted = options.weights == "factory" or fits_in_host(model_bytes(meta_model))
        use_factory = _agree(wanted, group, all)
    if not use_factory and rest:  # the rules first: a checkpoint then overwrites what it holds
        from pipeline.runtime.init import initialize

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
        with share_factory_weights(model_fn, seed, group) as factory_file:
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


# --- allocation ------------------------------------------------------------------------------


def init_order(model: nn.Module) -> dict[int, str]:
    """For each parameter, the name under which a whole-model initialisation writes it last."""
    last: dict[int, str] = {}
    for prefix, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False, remove_duplicate=False):
            last[id(p)] = f"{prefix}.{name}" if prefix else name
    return last


def allocate(
    modules: Sequence[nn.Module], model: nn.Module, device: torch.device
) -> tuple[Materialized, Callable[[], dict[str, nn.Parameter]]]:
    """Allocate ``modules`` (parts of ``model``) on ``device``; see [Note: building on meta].

    Returns the allocation (to be filled, see `pipeline.runtime.weights`) and a function that re-ties
    what ``to_empty`` untied, returning the parameters by every name they have.
    """
    source = init_order(model)
    places: dict[int, list[tuple[str, nn.Module, str]]] = collections.defaultdict(list)
    for part in modules:
        for prefix, module in part.named_modules(remove_duplicate=False):
            for name, p in module._parameters.items():
                if p is not None:
                    places[id(p)].append((f"{prefix}.{name}" if prefix else name, module, name))
    for part in modules:
        part.to_empty(device=device)

    def retie() -> dict[str, nn.Parameter]:
        named: dict[str, nn.Parameter] = {}
        for pid, where in places.items():
            chosen = next(
                (m._parameters[n] for q, m, n in where if q == source.get(pid)),
                where[0][1]._parameters[where[0][2]],
            )
            assert chosen is not None
            for qualified, module, name in where:
                module._parameters[name] = chosen
                named[qualified] = chosen
        return named

    return Materialized(modules), retie
