"""Bundled example models: a GPT-style decoder at toy to 10 B size, and small models for tests.

Every factory returns ``(model, example_inputs, loss_fn)``; call it under
``torch.device("meta")`` to build a model of any size without allocating a weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from partition.errors import PlanError

__all__ = [
    "GPT",
    "GPT_SIZES",
    "Block",
    "GPTConfig",
    "SkipNet",
    "TwoTower",
    "gpt",
    "lm_loss",
    "skipnet",
    "two_tower",
]


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """Shape of a GPT-style decoder."""

    vocab_size: int = 50304
    """Tokens in the vocabulary (and rows of the embedding and LM head)."""
    block_size: int = 1024
    """Longest sequence (rows of the position embedding)."""
    n_layer: int = 12
    """Transformer blocks."""
    n_head: int = 12
    """Attention heads per block."""
    n_embd: int = 768
    """Width of the residual stream; must divide by ``n_head``."""
    mlp_ratio: int = 4
    """Hidden width of the MLP as a multiple of ``n_embd``."""
    tie_weights: bool = False
    """Share the token embedding with the LM head (GPT-2 does)."""
    dropout: float = 0.0
    """Dropout after attention and MLP (0 keeps the pipeline comparisons exact)."""

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise PlanError(f"n_embd {self.n_embd} must divide by n_head {self.n_head}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise PlanError(f"GPTConfig.{name} must be at least 1, got {getattr(self, name)}")

    @property
    def num_parameters(self) -> int:
        """Parameters of the model built from this config (a tied head counted once)."""
        d, h = self.n_embd, self.n_embd * self.mlp_ratio
        block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d)
        head = 0 if self.tie_weights else self.vocab_size * d
        return self.vocab_size * d + self.block_size * d + self.n_layer * block + 2 * d + head


GPT_SIZES: dict[str, GPTConfig] = {
    "toy": GPTConfig(vocab_size=96, block_size=16, n_layer=4, n_head=2, n_embd=16),
    "small": GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "medium": GPTConfig(vocab_size=50304, block_size=1024, n_layer=24, n_head=16, n_embd=1024),
    "1b": GPTConfig(vocab_size=50304, block_size=2048, n_layer=24, n_head=16, n_embd=2048),
    "7b": GPTConfig(vocab_size=50304, block_size=4096, n_layer=32, n_head=32, n_embd=4096),
    "10b": GPTConfig(vocab_size=50304, block_size=2048, n_layer=32, n_head=40, n_embd=5120),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        batch, seq, width = x.size(0), x.size(1), x.size(2)
        q, k, v = self.c_attn(x).split(width, dim=2)  # 3 × (B, T, C)
        q = q.view(batch, seq, self.n_head, -1).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(batch, seq, self.n_head, -1).transpose(1, 2)
        v = v.view(batch, seq, self.n_head, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(batch, seq, width)  # (B, T, C)
        return self.dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_ratio * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(config.mlp_ratio * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token and position embeddings, ``n_layer`` blocks, a final LayerNorm and the LM head."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2's initialisation; also the per-module init hook pipepart's runtime calls."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor) -> Tensor:
        positions = torch.arange(idx.size(1), device=idx.device)  # (T,)
        x = self.wte(idx) + self.wpe(positions)  # (B, T, C)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross entropy of ``(B, T, V)`` logits against ``(B, T)`` targets."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def gpt(
    size: str | GPTConfig = "toy",
    *,
    batch: int = 8,
    seq: int | None = None,
    layers: int | None = None,
    tie_weights: bool | None = None,
) -> tuple[GPT, tuple[Tensor], Callable[[Tensor, Tensor], Tensor]]:
    """A GPT of a named size (``toy``, ``small``, ``medium``, ``1b``, ``7b``, ``10b``) or a config.

    Returns ``(model, (idx,), lm_loss)`` with ``idx`` of shape ``(batch, seq)`` on the current
    default device (``seq`` defaults to the block size). Under ``torch.device("meta")`` nothing is
    allocated.
    """
    if isinstance(size, GPTConfig):
        config = size
    else:
        key = size.lower()
        if key not in GPT_SIZES:
            raise PlanError(f"unknown GPT size {size!r}; sizes: {', '.join(GPT_SIZES)}")
        config = GPT_SIZES[key]
    if layers is not None:
        config = replace(config, n_layer=layers)
    if tie_weights is not None:
        config = replace(config, tie_weights=tie_weights)
    seq = config.block_size if seq is None else seq
    if not 1 <= seq <= config.block_size:
        raise PlanError(f"seq {seq} must be between 1 and the block size {config.block_size}")
    model = GPT(config)
    idx = (
        torch.randint(0, config.vocab_size, (batch, seq))
        if not _on_meta()
        else torch.empty(batch, seq, dtype=torch.long)
    )
    return model, (idx,), lm_loss


def _on_meta() -> bool:
    return torch.empty(0).device.type == "meta"


class SkipNet(nn.Module):
    """An MLP whose first activation is added back after the last layer: a skip across stages."""

    def __init__(self, width: int = 16, depth: int = 6) -> None:
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.layers = nn.ModuleList([nn.Linear(width, width) for _ in range(depth)])
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        skip = torch.tanh(self.inp(x))  # (B, W), used again at the very end
        h = skip
        for layer in self.layers:
            h = torch.relu(layer(h)) + 0.5 * h
        return self.out(h + skip)


def skipnet(
    *, batch: int = 8, width: int = 16, depth: int = 6
) -> tuple[SkipNet, tuple[Tensor], Callable[[Tensor, Tensor], Tensor]]:
    """A `SkipNet`, an input of shape ``(batch, width)`` and a mean-squared-error loss."""
    model = SkipNet(width, depth)
    x = torch.empty(batch, width) if _on_meta() else torch.randn(batch, width)
    return model, (x,), F.mse_loss


class TwoTower(nn.Module):
    """Two inputs merged half-way, two outputs: ``forward(a, b) -> (y, z)``."""

    def __init__(self, width: int = 12) -> None:
        super().__init__()
        self.a1 = nn.Linear(width, width)
        self.b1 = nn.Linear(width, width)
        self.mix = nn.Linear(2 * width, width)
        self.head_y = nn.Linear(width, width)
        self.head_z = nn.Linear(width, 1)

    def forward(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        ha, hb = torch.relu(self.a1(a)), torch.relu(self.b1(b))
        h = torch.relu(self.mix(torch.cat([ha, hb], dim=-1)))  # (B, W)
        return self.head_y(h) + ha, self.head_z(h)


def two_tower_loss(outputs: tuple[Tensor, Tensor], target: Tensor) -> Tensor:
    """Mean squared error of ``y`` against the target plus the mean of ``z`` squared."""
    y, z = outputs
    return F.mse_loss(y, target) + z.pow(2).mean()


def two_tower(
    *, batch: int = 8, width: int = 12
) -> tuple[TwoTower, tuple[Tensor, Tensor], Callable[[tuple[Tensor, Tensor], Tensor], Tensor]]:
    """A `TwoTower`, inputs ``(a, b)`` of shape ``(batch, width)`` and its loss."""
    model = TwoTower(width)
    make = torch.empty if _on_meta() else torch.randn
    return model, (make(batch, width), make(batch, width)), two_tower_loss
