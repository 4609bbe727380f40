"""Giving a stage real weights: deterministic per-parameter initialisation, or a checkpoint.

[Note: split-independent initialisation]
A rank builds the model on ``meta``, keeps its stage and allocates only that stage's tensors
(``to_empty``). Each module that directly owns parameters or buffers is then initialised by its
own rule — the model's init hook (``model._init_weights(module)``, as transformers models and the
bundled GPT have) if given, else ``module.reset_parameters()`` — with the random generator seeded
from ``(seed, the module's qualified name)``. The values therefore depend on the seed and the
name only, never on which other modules share the stage: `initialize` applied to a whole model in
one process gives exactly the values every rank gives its part, whatever the split.

Checkpoints are read per tensor (`pipeline.runtime.tensorfile.TensorFile`: safetensors, or a
``torch.save`` state_dict memory-mapped), so a rank reads only the tensors its stage owns.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.runtime.tensorfile import TensorFile

__all__ = ["initialize", "load_checkpoint", "materialize", "module_seed"]

InitHook = Callable[[nn.Module], None]


def module_seed(seed: int, name: str) -> int:
    """A 63-bit seed from the global ``seed`` and a module's qualified ``name``."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _post_order(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Submodules children-first, the order ``nn.Module.apply`` calls an init hook in."""
    for name, child in module.named_children():
        yield from _post_order(child, f"{prefix}.{name}" if prefix else name)
    yield prefix, module


def initialize(
    module: nn.Module,
    *,
    seed: int = 0,
    init_hook: InitHook | None = None,
    model: nn.Module | None = None,
) -> None:
    """Initialise ``module``'s tensors; see [Note: split-independent initialisation].

    Args:
        module: a whole model, or a stage module whose tensors carry the model's qualified names.
        seed: the global seed.
        init_hook: the model's per-module init (``model._init_weights``); without it, each module
            that directly owns tensors runs its ``reset_parameters``.
        model: the whole model the names refer to (on meta is fine). A stage module holds its
            tensors in plain containers, so the hook, which dispatches on module types, is run on
            ``model``'s own modules with the stage's tensors swapped in for the call.
    """
    root = model if model is not None else module
    tensors: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    for t in tensors.values():  # transformers skips tensors it marked as initialised
        if hasattr(t, "_is_hf_initialized"):
            del t._is_hf_initialized
    below: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        atoms = name.split(".")
        for depth in range(len(atoms)):
            below.setdefault(".".join(atoms[:depth]), {})[".".join(atoms[depth:])] = tensor
    with torch.no_grad():
        for name, sub in _post_order(root):
            local = below.get(name)
            if not local:
                continue
            direct = any("." not in key for key in local)
            reset = getattr(sub, "reset_parameters", None) or getattr(
                sub, "_reset_parameters", None
            )  # nn.MultiheadAttention's
            if init_hook is None and not (direct and callable(reset)):
                continue
            devices = [t.device for t in local.values() if t.device.type == "cuda"]
            with (
                _swapped(sub, local, root is not module),
                torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"),
            ):
                torch.manual_seed(module_seed(seed, name))
                if init_hook is not None:
                    init_hook(sub)
                elif callable(reset):
                    reset()


def _swapped(module: nn.Module, tensors: dict[str, torch.Tensor], swap: bool) -> Any:
    if not swap:
        return contextlib.nullcontext()
    return torch.nn.utils.stateless._reparametrize_module(module, tensors, strict=False)


def materialize(
    module: nn.Module,
    device: torch.device | str = "cpu",
    *,
    seed: int = 0,
    init_hook: InitHook | None = None,
    checkpoint: str | Path | None = None,
    model: nn.Module | None = None,
) -> nn.Module:
    """Allocate ``module``'s meta tensors on ``device`` and fill them (init or checkpoint).

    Tensors already on a real device are moved to ``device`` and kept as they are. ``model`` is
    the whole model ``module``'s names refer to; see `initialize`.
    """
    on_meta = any(t.device.type == "meta" for t in module.state_dict().values())
    if on_meta:
        module.to_empty(device=device)
        if checkpoint is None:
            initialize(module, seed=seed, init_hook=init_hook, model=model)
    else:
        module.to(device)
    if checkpoint is not None:
        load_checkpoint(module, checkpoint)
    return module


def load_checkpoint(module: nn.Module, path: str | Path) -> list[str]:
    """Copy the tensors ``module`` owns (its ``state_dict``) from a whole-model checkpoint, one
    tensor at a time (`TensorFile`); returns the keys read.

    Raises:
        CheckpointError: the file is missing or unreadable, or lacks a tensor, or a tensor's
            shape differs.
    """
    wanted = module.state_dict(keep_vars=True)
    with TensorFile(path) as file:
        file.require(wanted, "this stage")
        for key, target in wanted.items():
            file.load_into(key, target)
    return list(wanted)
