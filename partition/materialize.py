"""Giving a stage real weights: deterministic per-parameter initialisation, or a checkpoint.

[Note: split-independent initialisation]
A rank builds the model on ``meta``, keeps its stage and allocates only that stage's tensors
(``to_empty``). Each module that directly owns parameters or buffers is then initialised by its
own rule — the model's init hook (``model._init_weights(module)``, as transformers models and the
bundled GPT have) if given, else ``module.reset_parameters()`` — with the random generator seeded
from ``(seed, the module's qualified name)``. The values therefore depend on the seed and the
name only, never on which other modules share the stage: `initialize` applied to a whole model in
one process gives exactly the values every rank gives its part, whatever the split.

Checkpoints are read per tensor: safetensors through ``safe_open`` and ``torch.save`` files
through ``torch.load(mmap=True)``, so a rank reads only the tensors its stage owns.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from partition.errors import CheckpointError

__all__ = ["initialize", "load_checkpoint", "materialize", "module_seed"]

InitHook = Callable[[nn.Module], None]


def module_seed(seed: int, name: str) -> int:
    """A 63-bit seed from the global ``seed`` and a module's qualified ``name``."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _owners(module: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    for name, sub in module.named_modules(remove_duplicate=True):
        if any(True for _ in sub.parameters(recurse=False)) or any(
            True for _ in sub.buffers(recurse=False)
        ):
            yield name, sub


def initialize(module: nn.Module, *, seed: int = 0, init_hook: InitHook | None = None) -> None:
    """Initialise every parameter-owning submodule of ``module``; see [Note: split-independent initialisation].

    Names are ``module``'s own qualified names, which for a stage module are the whole model's.
    """
    with torch.no_grad():
        for name, sub in _owners(module):
            devices = [p.device for p in sub.parameters(recurse=False)] or [torch.device("cpu")]
            cuda = [d for d in devices if d.type == "cuda"]
            with torch.random.fork_rng(devices=cuda, device_type="cuda" if cuda else "cpu"):
                torch.manual_seed(module_seed(seed, name))
                if init_hook is not None:
                    init_hook(sub)
                elif callable(reset := getattr(sub, "reset_parameters", None)):
                    reset()


def materialize(
    module: nn.Module,
    device: torch.device | str = "cpu",
    *,
    seed: int = 0,
    init_hook: InitHook | None = None,
    checkpoint: str | Path | None = None,
) -> nn.Module:
    """Allocate ``module``'s meta tensors on ``device`` and fill them (init or checkpoint).

    Tensors already on a real device are moved to ``device`` and kept as they are.
    """
    on_meta = any(t.device.type == "meta" for t in module.state_dict().values())
    if on_meta:
        module.to_empty(device=device)
        if checkpoint is None:
            initialize(module, seed=seed, init_hook=init_hook)
    else:
        module.to(device)
    if checkpoint is not None:
        load_checkpoint(module, checkpoint)
    return module


def load_checkpoint(module: nn.Module, path: str | Path) -> list[str]:
    """Copy the tensors ``module`` owns from a whole-model checkpoint; returns the keys read.

    Raises:
        CheckpointError: the file is missing, or lacks a tensor, or a tensor's shape differs.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    wanted = module.state_dict(keep_vars=True)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            available = set(f.keys())
            _check_keys(wanted, available, path)
            for key, target in wanted.items():
                _copy(key, target, f.get_tensor(key), path)
    else:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state_dict")
        _check_keys(wanted, set(state), path)
        for key, target in wanted.items():
            _copy(key, target, state[key], path)
    return list(wanted)


def _check_keys(wanted: dict[str, torch.Tensor], available: set[str], path: Path) -> None:
    missing = [k for k in wanted if k not in available]
    if missing:
        raise CheckpointError(
            f"{path} lacks {len(missing)} tensor(s) this stage needs, e.g. {missing[:3]}; "
            "the checkpoint must be a whole-model state_dict with the model's own key names"
        )


def _copy(key: str, target: torch.Tensor, source: torch.Tensor, path: Path) -> None:
    if tuple(source.shape) != tuple(target.shape):
        raise CheckpointError(
            f"{path}: tensor {key!r} has shape {tuple(source.shape)}, the model expects {tuple(target.shape)}"
        )
    with torch.no_grad():
        target.copy_(source.to(dtype=target.dtype, device=target.device))
