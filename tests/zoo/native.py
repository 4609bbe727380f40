"""Zoo models written in plain torch: torch's own transformers, PyTorch's pipelining test zoo, and
the corner cases of issue 9 (custom autograd, functional dropout, weights loaded from a file).

Every factory follows the zoo's contract (see `zoo.models`): ``name(size="tiny", batch=4) ->
(model, inputs, loss_fn, target)``, random weights from the global seed, inputs and target from
a local generator, ``size="real"`` only under ``torch.device("meta")``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.pipelining import pipe_split

import partition.models.examples as examples

__all__ = [
    "Built",
    "floats",
    "func_dropout",
    "ints",
    "nn_transformer",
    "nn_transformer_encoder",
    "on_meta",
    "pipepart_gpt",
    "pipepart_skipnet",
    "pipepart_two_tower",
    "pp_default_arg",
    "pp_mlp_raw",
    "pp_shared",
    "pp_split",
    "reversal",
    "trained_weights",
]

Built = tuple[nn.Module, Any, Callable[[Any, Tensor], Tensor], Tensor]
"""What every zoo factory returns: ``(model, inputs, loss_fn, target)``."""

_SEED = 1234  # the inputs' and targets' own stream, independent of the model's construction


def on_meta() -> bool:
    """Whether the factory runs under ``torch.device("meta")``."""
    return torch.empty(0).device.type == "meta"


def _generator(salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(_SEED + salt)


def floats(*shape: int, salt: int = 0) -> Tensor:
    """Standard-normal values from the local stream (``torch.empty`` on meta)."""
    if on_meta():
        return torch.empty(*shape)
    return torch.randn(*shape, generator=_generator(salt), device="cpu")


def ints(high: int, *shape: int, salt: int = 0) -> Tensor:
    """Integers in ``[0, high)`` from the local stream (``torch.empty`` on meta)."""
    if on_meta():
        return torch.empty(*shape, dtype=torch.long)
    return torch.randint(0, high, shape, generator=_generator(salt), device="cpu")


def _mse(output: Any, target: Tensor) -> Tensor:
    return F.mse_loss(output if isinstance(output, Tensor) else output[0], target)


def _tiny(size: str) -> bool:
    if size not in ("tiny", "real"):
        raise ValueError(f"zoo sizes are 'tiny' and 'real', not {size!r}")
    return size == "tiny"


# --- torch.nn's transformers -------------------------------------------------------------------


def nn_transformer_encoder(size: str = "tiny", batch: int = 4) -> Built:
    """`nn.TransformerEncoder`; real: BERT-base's shape (12 layers, width 768, sequence 512)."""
    d, heads, ff, layers, seq = (32, 2, 64, 2, 8) if _tiny(size) else (768, 12, 3072, 12, 512)
    layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    return model, (floats(batch, seq, d),), _mse, floats(batch, seq, d, salt=1)


def nn_transformer(size: str = "tiny", batch: int = 4) -> Built:
    """`nn.Transformer` (encoder-decoder); real: the paper's base model (6 + 6 layers, 512)."""
    d, heads, ff, layers, seq = (32, 2, 64, 1, 8) if _tiny(size) else (512, 8, 2048, 6, 256)
    model = nn.Transformer(d, heads, layers, layers, ff, dropout=0.0, batch_first=True)
    src, tgt = floats(batch, seq, d), floats(batch, seq, d, salt=1)
    return model, (src, tgt), _mse, floats(batch, seq, d, salt=2)


def nn_sequential(size: str = "tiny", batch: int = 4) -> Built:
    """A plain `nn.Sequential` (its forward's argument is called ``input``); real: 16 layers of
    width 4096."""
    d, layers = (16, 4) if _tiny(size) else (4096, 16)
    blocks = [m for _ in range(layers) for m in (nn.Linear(d, d), nn.GELU())]
    model = nn.Sequential(*blocks, nn.LayerNorm(d))
    return model, (floats(batch, d),), _mse, floats(batch, d, salt=1)


# --- pipepart's bundled models (already tested elsewhere; here on the zoo's terms) ------------


def pipepart_gpt(size: str = "tiny", batch: int = 4) -> Built:
    """The bundled GPT: toy (2 blocks, width 32) or GPT-2 small's shape."""
    seq = 16 if _tiny(size) else 1024
    model, _, loss = examples.gpt("toy" if _tiny(size) else "small", batch=batch, seq=seq)
    vocab = model.config.vocab_size
    return model, (ints(vocab, batch, seq),), loss, ints(vocab, batch, seq, salt=1)


def pipepart_skipnet(size: str = "tiny", batch: int = 4) -> Built:
    """The bundled `SkipNet`: a skip connection from the first layer to the last."""
    width = 16 if _tiny(size) else 4096
    model, _, loss = examples.skipnet(batch=batch, width=width)
    return model, (floats(batch, width),), loss, floats(batch, width, salt=1)


def pipepart_two_tower(size: str = "tiny", batch: int = 4) -> Built:
    """The bundled `TwoTower`: two inputs, two outputs."""
    width = 12 if _tiny(size) else 4096
    model, _, loss = examples.two_tower(batch=batch, width=width)
    inputs = (floats(batch, width), floats(batch, width, salt=1))
    return model, inputs, loss, floats(batch, width, salt=2)


# --- equivalents of torch.distributed.pipelining's test zoo ------------------------------------


class RawMLP(nn.Module):
    """Weights as raw ``nn.Parameter(torch.randn(...))`` and a ``torch.randn`` buffer, made in
    ``__init__`` (no ``reset_parameters`` anywhere)."""

    def __init__(self, d: int, layers: int) -> None:
        super().__init__()
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.randn(d, d) / d**0.5) for _ in range(layers)]
        )
        self.bias = nn.Parameter(torch.randn(d) * 0.1)
        self.scale: Tensor
        self.register_buffer("scale", 1.0 + 0.1 * torch.randn(d))
        self.lin = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        for w in self.weights:
            x = torch.relu(x @ w + self.bias) * self.scale  # (B, D)
        return self.lin(x)


def pp_mlp_raw(size: str = "tiny", batch: int = 4) -> Built:
    """`RawMLP`."""
    d, layers = (16, 3) if _tiny(size) else (4096, 8)
    return RawMLP(d, layers), (floats(batch, d),), _mse, floats(batch, d, salt=1)


def _with_default(d: int) -> type[nn.Module]:
    default = torch.linspace(-1.0, 1.0, d).unsqueeze(0)  # (1, D), made when the class is

    class DefaultArg(nn.Module):
        """A tensor default argument in ``forward`` (PyTorch's ``ModelWithKwargs``)."""

        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)

        def forward(self, x: Tensor, y: Tensor = default) -> Tensor:
            x = torch.relu(self.fc1(x)) + y  # the constant reaches a later layer
            return self.fc2(x) * y

    return DefaultArg


_DEFAULT_ARG = {d: _with_default(d) for d in (16, 4096)}


def pp_default_arg(size: str = "tiny", batch: int = 4) -> Built:
    """`forward(self, x, y=<a tensor made at class definition>)`, called with ``x`` only."""
    d = 16 if _tiny(size) else 4096
    return _DEFAULT_ARG[d](), (floats(batch, d),), _mse, floats(batch, d, salt=1)


class SplitMarked(nn.Module):
    """Layers separated by `torch.distributed.pipelining.pipe_split` markers."""

    def __init__(self, d: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d, d) for _ in range(layers)])

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            if i:
                pipe_split()
            x = torch.relu(layer(x))
        return x


def pp_split(size: str = "tiny", batch: int = 4) -> Built:
    """`SplitMarked`: the user's own cuts, as `torch.distributed.pipelining` users write them."""
    d, layers = (16, 4) if _tiny(size) else (4096, 8)
    return SplitMarked(d, layers), (floats(batch, d),), _mse, floats(batch, d, salt=1)


class Shared(nn.Module):
    """One parameter and one `nn.Linear` each used twice, far apart (``ModelWithParamAlias``)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) / d**0.5)
        self.lin = nn.Linear(d, d)
        self.mid = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d), nn.Tanh())

    def forward(self, x: Tensor) -> Tensor:
        x = torch.tanh(self.lin(x @ self.w))
        x = self.mid(x)
        return self.lin(x) @ self.w  # the same two again, at the end


def pp_shared(size: str = "tiny", batch: int = 4) -> Built:
    """`Shared`."""
    d = 16 if _tiny(size) else 4096
    return Shared(d), (floats(batch, d),), _mse, floats(batch, d, salt=1)


# --- issue 9's corner cases --------------------------------------------------------------------


class _Reverse(torch.autograd.Function):
    """Forward the identity, backward the negated gradient (domain-adversarial training)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return -grad


class Reversal(nn.Module):
    """A feature extractor, a gradient-reversal layer, a head."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d), nn.Tanh())
        self.head = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(_Reverse.apply(self.features(x)))


def reversal(size: str = "tiny", batch: int = 4) -> Built:
    """`Reversal`: the features' gradients are negated, which a trace must not lose."""
    d = 16 if _tiny(size) else 4096
    return Reversal(d), (floats(batch, d),), _mse, floats(batch, d, salt=1)


class FunctionalDropout(nn.Module):
    """``F.dropout(x, p, self.training)``: the mode is read in ``forward``, not from a module."""

    def __init__(self, d: int, p: float = 0.5) -> None:
        super().__init__()
        self.p = p
        self.layers = nn.ModuleList([nn.Linear(d, d) for _ in range(4)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = F.dropout(torch.relu(layer(x)), self.p, self.training)
        return x


def func_dropout(size: str = "tiny", batch: int = 4) -> Built:
    """`FunctionalDropout` (dropout kept: compared in eval mode, where it must be off)."""
    d = 16 if _tiny(size) else 4096
    return FunctionalDropout(d), (floats(batch, d),), _mse, floats(batch, d, salt=1)


class Trained(nn.Module):
    """An MLP whose factory loads "trained" weights from a file (``load_state_dict``)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d), nn.GELU())
        self.out = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.layers(x))


def _weights_file(model: nn.Module) -> Path:
    """A state dict unlike any initialisation, written once into a temporary directory."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    digest = hashlib.sha256(repr(sorted(shapes.items())).encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / "pipepart-zoo" / f"trained-{digest}.pt"
    if not path.exists():
        g = torch.Generator().manual_seed(_SEED + 99)
        state = {k: 0.2 * torch.randn(s, generator=g, device="cpu") for k, s in shapes.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")  # ranks may race: write, then rename
        torch.save(state, partial)
        os.replace(partial, path)
    return path


def trained_weights(size: str = "tiny", batch: int = 4) -> Built:
    """`Trained`: ``model.load_state_dict(torch.load(path))``, as a user's factory does."""
    d = 16 if _tiny(size) else 1024
    model = Trained(d)
    model.load_state_dict(torch.load(_weights_file(model), map_location="cpu"))
    return model, (floats(batch, d),), _mse, floats(batch, d, salt=1)
