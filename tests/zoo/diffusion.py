"""Diffusion models of the zoo: diffusers U-Nets built from configs.

Factories follow [Note: the zoo's factory contract] in `zoo.models`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from zoo.losses import sample_mse
from zoo.native import Built, floats, ints


def _timesteps(batch: int) -> Tensor:
    return ints(1000, batch, salt=3)


def diffusers_unet2d(size: str = "tiny", batch: int = 4) -> Built:
    """diffusers `UNet2DModel` (``google/ddpm-cifar10-32``'s shape); tiny: widths 16-32, 16x16."""
    import diffusers

    model: Any  # a diffusers ModelMixin (an nn.Module)
    if size == "tiny":
        model = diffusers.UNet2DModel(
            sample_size=16,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
            attention_head_dim=8,
        )
        side = 16
    else:
        model = diffusers.UNet2DModel(
            sample_size=32,
            block_out_channels=(128, 256, 256, 256),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            dropout=0.0,
        )
        side = 32
    inputs = {"sample": floats(batch, 3, side, side), "timestep": _timesteps(batch)}
    return model, inputs, sample_mse, floats(batch, 3, side, side, salt=1)


def diffusers_unet2d_condition(size: str = "tiny", batch: int = 4) -> Built:
    """diffusers `UNet2DConditionModel` (Stable Diffusion 1.5's shape); tiny: widths 16-32."""
    import diffusers

    model: Any
    if size == "tiny":
        model = diffusers.UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        side, tokens, width = 16, 4, 16
    else:
        model = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        side, tokens, width = 64, 77, 768
    inputs = {
        "sample": floats(batch, 4, side, side),
        "timestep": _timesteps(batch),
        "encoder_hidden_states": floats(batch, tokens, width, salt=2),
    }
    return model, inputs, sample_mse, floats(batch, 4, side, side, salt=1)
