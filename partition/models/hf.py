"""Hugging Face transformers models from a config (random weights; nothing is downloaded).

``hf:gpt2``, ``hf:bert``, ``hf:llama`` and ``hf:vit`` at two sizes: ``tiny`` (tests, seconds on a
CPU) and ``real`` (the published shape — GPT-2 124M, BERT-base, Llama-2-7B, ViT-B/16 — meant for
``torch.device("meta")``). Every factory returns ``(model, kwargs, loss_fn, target)``: keyword inputs as a
dict (``input_ids``, ``attention_mask`` or ``pixel_values``) and a loss of the model output and a
target, plus a synthetic target, so labels go to the last stage only. Caches and dropout are off, so a pipeline run can be
compared with one process exactly.

Needs the ``hf`` extra: ``pip install -c constraints.txt -e ".[hf]"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from partition.errors import InputError

__all__ = ["HF_MODELS", "factory"]

_SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "gpt2": {
        "tiny": dict(n_layer=4, n_embd=32, n_head=2, vocab_size=128, n_positions=64),
        "real": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
    },
    "bert": {
        "tiny": dict(
            num_hidden_layers=4,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            vocab_size=128,
            max_position_embeddings=64,
        ),
        "real": dict(
            num_hidden_layers=12,
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            vocab_size=30522,
        ),
    },
    "llama": {
        "tiny": dict(
            num_hidden_layers=4,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            max_position_embeddings=64,
        ),
        "real": dict(
            num_hidden_layers=32,
            hidden_size=4096,
            intermediate_size=11008,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
            max_position_embeddings=4096,
        ),
    },
    "vit": {
        "tiny": dict(
            num_hidden_layers=4,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            num_labels=10,
        ),
        "real": dict(
            num_hidden_layers=12,
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            image_size=224,
            patch_size=16,
            num_labels=1000,
        ),
    },
}
HF_MODELS: tuple[str, ...] = tuple(_SIZES)


def causal_lm_loss(output: Any, target: Tensor) -> Tensor:
    """Next-token cross entropy: logits at position t predict target t + 1 (mean)."""
    logits = output.logits if hasattr(output, "logits") else output[0]
    shifted = logits[:, :-1, :].reshape(-1, logits.size(-1))  # (B*(T-1), V)
    return F.cross_entropy(shifted, target[:, 1:].reshape(-1))


def masked_lm_loss(output: Any, target: Tensor) -> Tensor:
    """Cross entropy at every position (mean)."""
    logits = output.logits if hasattr(output, "logits") else output[0]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1))


def classification_loss(output: Any, target: Tensor) -> Tensor:
    """Cross entropy of class logits (mean)."""
    logits = output.logits if hasattr(output, "logits") else output[0]
    return F.cross_entropy(logits, target)


def _build(
    kind: str, size: str, batch: int, seq: int | None
) -> tuple[Any, dict[str, Tensor], Callable[..., Tensor], Tensor]:
    try:
        import transformers
    except ImportError as e:
        raise InputError(
            'hf: models need transformers: pip install -c constraints.txt -e ".[hf]"'
        ) from e
    size = size or "tiny"
    if size not in _SIZES[kind]:
        raise InputError(f"hf:{kind} has sizes {', '.join(_SIZES[kind])}, not {size!r}")
    shape = dict(_SIZES[kind][size])
    meta = torch.empty(0).device.type == "meta"

    def ints(high: int, *dims: int) -> Tensor:
        return torch.empty(*dims, dtype=torch.long) if meta else torch.randint(0, high, dims)

    config: Any
    model: Any
    if kind == "vit":
        config = transformers.ViTConfig(
            **shape, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
        )
        model = transformers.ViTForImageClassification(config)
        side = int(config.image_size)
        pixels = torch.empty(batch, 3, side, side) if meta else torch.randn(batch, 3, side, side)
        labels = (
            torch.empty(batch, dtype=torch.long)
            if meta
            else torch.randint(0, config.num_labels, (batch,))
        )
        return model, {"pixel_values": pixels}, classification_loss, labels
    if kind == "gpt2":
        config = transformers.GPT2Config(
            **shape, use_cache=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
        )
        model = transformers.GPT2LMHeadModel(config)
        limit, loss = config.n_positions, causal_lm_loss
    elif kind == "bert":
        config = transformers.BertConfig(
            **shape, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
        )
        model = transformers.BertForMaskedLM(config)
        limit, loss = config.max_position_embeddings, masked_lm_loss
    else:
        config = transformers.LlamaConfig(**shape, use_cache=False)
        model = transformers.LlamaForCausalLM(config)
        limit, loss = config.max_position_embeddings, causal_lm_loss
    seq = seq or min(limit, 16 if size == "tiny" else 1024)
    if kind == "llama" and seq > limit:  # rotary positions: any length, as long-context runs do
        config.max_position_embeddings = limit = seq
    if seq > limit:
        raise InputError(f"seq {seq} exceeds hf:{kind}'s {limit} positions")
    ids = ints(config.vocab_size, batch, seq)
    mask = torch.ones(batch, seq, dtype=torch.long)
    return (
        model,
        {"input_ids": ids, "attention_mask": mask},
        loss,
        ints(config.vocab_size, batch, seq),
    )


def factory(kind: str) -> Callable[..., Any]:
    """The factory of ``hf:KIND`` for `partition.models.registry`."""
    if kind not in _SIZES:
        raise InputError(
            f"unknown hf model {kind!r}; choose one of {', '.join(f'hf:{k}' for k in _SIZES)}"
        )

    def build(size: str = "", batch: int = 8, seq: int | None = None, **options: Any) -> Any:
        return _build(kind, size, batch, seq)

    return build
