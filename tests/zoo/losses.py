"""The zoo's losses: what each family of models trains on."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from partition.models.hf import classification_loss, masked_lm_loss

__all__ = ["logits_ce", "sample_mse", "seq2seq_loss"]


def logits_ce(output: Any, target: Tensor) -> Tensor:
    """Cross entropy of class logits (a tensor, or an output with ``.logits``)."""
    return classification_loss(output if not isinstance(output, Tensor) else (output,), target)


def seq2seq_loss(output: Any, target: Tensor) -> Tensor:
    """Cross entropy of the decoder's logits at every position (mean)."""
    return masked_lm_loss(output, target)


def sample_mse(output: Any, target: Tensor) -> Tensor:
    """Mean squared error of a diffusers U-Net's predicted noise."""
    sample = output.sample if hasattr(output, "sample") else output[0]
    return F.mse_loss(sample, target)
