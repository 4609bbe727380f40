"""The tensor file a rank reads its weights from, one tensor at a time: safetensors or torch.save.

`save_tensors` writes every parameter and buffer of a module (persistent or not) to a safetensors
file, a tensor known under several names once with the other names as aliases in the metadata;
`TensorFile` reads such a file — or any safetensors file, or a ``torch.save`` state_dict — one
tensor at a time, straight into the tensor that receives it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from partition.errors import CheckpointError, InputError

__all__ = ["TensorFile", "all_tensors", "save_tensors"]

_ALIASES = "pipepart.aliases"


def all_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer (persistent or not) by every name it has."""
    tensors: dict[str, Tensor] = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    return tensors


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

    def require(self, names: Iterable[str], what: str) -> None:
        """Raise `CheckpointError` unless the file holds every tensor of ``names``, the tensors
        of ``what`` (e.g. ``"this rank's stages"``)."""
        lacking = [n for n in names if n not in self.names]
        if lacking:
            raise CheckpointError(
                f"{self.path} lacks {len(lacking)} tensor(s) of {what}, e.g. "
                f"{lacking[:3]}; the checkpoint must be a whole-model state_dict with the "
                "model's own key names"
            )

    def load_into(self, name: str, target: Tensor) -> None:
        """Write tensor ``name`` into ``target`` (`copy_to`), after checking its shape.

        Raises:
            CheckpointError: the shapes differ.
        """
        shape = self.shape(name)
        if shape != tuple(target.shape):
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has shape {shape}, the model expects "
                f"{tuple(target.shape)}"
            )
        with torch.no_grad():
            self.copy_to(name, target)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name``, read from the header (nothing else is read)."""
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
