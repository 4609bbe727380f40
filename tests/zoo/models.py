"""The model zoo: third-party models as users bring them, each a factory, all in `ZOO`.

[Note: the zoo's factory contract]
``factory(size="tiny", batch=4) -> (model, inputs, loss_fn, target)``: ``inputs`` a tuple of
tensors or a dict of keyword tensors, ``loss_fn(output, target)`` a scalar, ``target`` a tensor
with the batch first. Models are built from configs with random weights (nothing is downloaded);
the factory never seeds (the caller does: ``torch.manual_seed(0); factory()``) but is
deterministic given the global seed, and draws inputs and target from a local generator so that
they do not depend on the model. ``size="tiny"`` trains in seconds on a CPU; ``size="real"`` is
the published shape and is only ever built under ``torch.device("meta")``. Dropout is off where a
config allows it; BatchNorm stays (in train mode: statistics per micro-batch).

The libraries (torchvision, timm, transformers, diffusers) are imported inside the factories:
``pip install -c constraints.txt -e ".[zoo]"`` and ``python .ci/torchvision_cpu.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from partition.models.hf import causal_lm_loss, classification_loss, masked_lm_loss
from zoo import native
from zoo.native import Built, floats, ints

__all__ = ["ZOO", "Factory", "ZooModel"]

Factory = Callable[..., Built]


def _logits_ce(output: Any, target: Tensor) -> Tensor:
    """Cross entropy of class logits (a tensor, or an output with ``.logits``)."""
    return classification_loss(output if not isinstance(output, Tensor) else (output,), target)


def _seq2seq_loss(output: Any, target: Tensor) -> Tensor:
    """Cross entropy of the decoder's logits at every position (mean)."""
    return masked_lm_loss(output, target)


def _sample_mse(output: Any, target: Tensor) -> Tensor:
    """Mean squared error of a diffusers U-Net's predicted noise."""
    sample = output.sample if hasattr(output, "sample") else output[0]
    return F.mse_loss(sample, target)


def _images(size: str, batch: int, tiny: int, real: int, classes: tuple[int, int]) -> Any:
    side, n = (tiny, classes[0]) if size == "tiny" else (real, classes[1])
    return (floats(batch, 3, side, side),), ints(n, batch, salt=1)


# --- torchvision ---------------------------------------------------------------------------------


def tv_resnet50(size: str = "tiny", batch: int = 4) -> Built:
    """torchvision ResNet-50; tiny: one bottleneck per stage, inner width 16-128, 64x64."""
    from torchvision.models import resnet

    if size == "tiny":
        model = resnet.ResNet(resnet.Bottleneck, [1, 1, 1, 1], num_classes=10, width_per_group=16)
    else:
        model = resnet.resnet50()
    inputs, target = _images(size, batch, 64, 224, (10, 1000))
    return model, inputs, _logits_ce, target


def tv_vit_b_16(size: str = "tiny", batch: int = 4) -> Built:
    """torchvision ViT-B/16; tiny: 2 layers of width 32 on 32x32 images in 8x8 patches."""
    from torchvision.models import vision_transformer as vt

    if size == "tiny":
        model = vt.VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=10)
    else:
        model = vt.vit_b_16()
    inputs, target = _images(size, batch, 32, 224, (10, 1000))
    return model, inputs, _logits_ce, target


def tv_densenet121(size: str = "tiny", batch: int = 4) -> Built:
    """torchvision DenseNet-121; tiny: two dense blocks of two layers, growth 8."""
    from torchvision.models import densenet

    if size == "tiny":
        model = densenet.DenseNet(8, (2, 2), 16, bn_size=2, num_classes=10)
    else:
        model = densenet.densenet121()
    inputs, target = _images(size, batch, 32, 224, (10, 1000))
    return model, inputs, _logits_ce, target


def tv_googlenet(size: str = "tiny", batch: int = 4) -> Built:
    """torchvision GoogLeNet (its fixed widths, no auxiliary heads, no dropout); tiny: 32x32."""
    from torchvision.models.googlenet import GoogLeNet

    model = GoogLeNet(
        num_classes=10 if size == "tiny" else 1000, aux_logits=False, init_weights=True, dropout=0.0
    )
    inputs, target = _images(size, batch, 32, 224, (10, 1000))
    return model, inputs, _logits_ce, target


# --- timm ----------------------------------------------------------------------------------------


def timm_resnet(size: str = "tiny", batch: int = 4) -> Built:
    """timm ``resnet50``; tiny: one basic block per stage, widths 16-128, 64x64."""
    import timm
    from timm.models import resnet

    model: nn.Module
    if size == "tiny":
        model = resnet.ResNet(
            resnet.BasicBlock,  # type: ignore[arg-type]  # timm annotates the class as an instance
            (1, 1, 1, 1),
            num_classes=10,
            stem_width=16,
            channels=(16, 32, 64, 128),
        )
    else:
        model = timm.create_model("resnet50", pretrained=False)
    inputs, target = _images(size, batch, 64, 224, (10, 1000))
    return model, inputs, _logits_ce, target


def timm_vit(size: str = "tiny", batch: int = 4) -> Built:
    """timm ``vit_base_patch16_224``; tiny: 2 blocks of width 32, 32x32 in 8x8 patches."""
    import timm

    if size == "tiny":
        small: dict[str, Any] = dict(
            img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10
        )
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **small)
    else:
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
    inputs, target = _images(size, batch, 32, 224, (10, 1000))
    return model, inputs, _logits_ce, target


def timm_convnext(size: str = "tiny", batch: int = 4) -> Built:
    """timm ``convnext_tiny``; tiny: one block per stage, widths 16-128 (layer scale kept)."""
    import timm

    if size == "tiny":
        small: dict[str, Any] = dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), num_classes=10)
        model = timm.create_model("convnext_atto", pretrained=False, **small)
    else:
        model = timm.create_model("convnext_tiny", pretrained=False)
    inputs, target = _images(size, batch, 32, 224, (10, 1000))
    return model, inputs, _logits_ce, target


def timm_swin(size: str = "tiny", batch: int = 4) -> Built:
    """timm ``swin_tiny_patch4_window7_224`` (drop-path off); tiny: 2 stages of width 16-32."""
    import timm

    small: dict[str, Any] = {}
    if size == "tiny":
        small = dict(
            img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2)
        )
    model = timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        drop_path_rate=0.0,
        num_classes=10 if size == "tiny" else 1000,
        **small,
    )
    inputs, target = _images(size, batch, 32, 224, (10, 1000))
    return model, inputs, _logits_ce, target


# --- Hugging Face transformers -------------------------------------------------------------------


def _tokens(size: str, batch: int, vocab: int, seq: tuple[int, int]) -> Any:
    n = seq[0] if size == "tiny" else seq[1]
    return ints(vocab, batch, n), ints(vocab, batch, n, salt=1)


def hf_gpt2(size: str = "tiny", batch: int = 4) -> Built:
    """GPT-2 (124M when real), causal LM loss."""
    import transformers

    shape: dict[str, Any] = (
        dict(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64)
        if size == "tiny"
        else dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    )
    if size == "tiny":  # special tokens inside the small vocabulary
        shape.update(bos_token_id=0, eos_token_id=0)
    config = transformers.GPT2Config(
        **shape, use_cache=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    ids, target = _tokens(size, batch, config.vocab_size, (16, 1024))
    model = transformers.GPT2LMHeadModel(config)
    return model, {"input_ids": ids}, causal_lm_loss, target


def hf_bert(size: str = "tiny", batch: int = 4) -> Built:
    """BERT-base, masked-LM head, loss at every position."""
    import transformers

    shape: dict[str, Any] = (
        dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2)
        if size == "tiny"
        else {}
    )
    config = transformers.BertConfig(
        **shape,
        vocab_size=128 if size == "tiny" else 30522,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    ids, target = _tokens(size, batch, config.vocab_size, (16, 512))
    model = transformers.BertForMaskedLM(config)
    return model, {"input_ids": ids}, masked_lm_loss, target


def hf_llama(size: str = "tiny", batch: int = 4) -> Built:
    """Llama-2-7B's shape, causal LM loss."""
    import transformers

    shape: dict[str, Any] = (
        dict(
            num_hidden_layers=2,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            max_position_embeddings=64,
        )
        if size == "tiny"
        else dict(
            num_hidden_layers=32,
            hidden_size=4096,
            intermediate_size=11008,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
            max_position_embeddings=4096,
        )
    )
    config = transformers.LlamaConfig(**shape, use_cache=False)
    ids, target = _tokens(size, batch, config.vocab_size, (16, 1024))
    return transformers.LlamaForCausalLM(config), {"input_ids": ids}, causal_lm_loss, target


def hf_t5(size: str = "tiny", batch: int = 4) -> Built:
    """T5-base (encoder-decoder): ``input_ids`` and ``decoder_input_ids`` in, the labels on the
    last stage only."""
    import transformers

    shape: dict[str, Any] = (
        dict(d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2, vocab_size=128)
        if size == "tiny"
        else dict(d_model=768, d_ff=3072, d_kv=64, num_layers=12, num_heads=12, vocab_size=32128)
    )
    shape.update(dropout_rate=0.0, use_cache=False, decoder_start_token_id=0)
    config = transformers.T5Config(**shape)
    n = 16 if size == "tiny" else 512
    ids, decoder_ids = ints(config.vocab_size, batch, n), ints(config.vocab_size, batch, n, salt=1)
    inputs = {"input_ids": ids, "decoder_input_ids": decoder_ids}
    model = transformers.T5ForConditionalGeneration(config)
    return model, inputs, _seq2seq_loss, ints(config.vocab_size, batch, n, salt=2)


def hf_vit(size: str = "tiny", batch: int = 4) -> Built:
    """HF ViT-B/16 with a classification head."""
    import transformers

    shape: dict[str, Any] = (
        dict(
            num_hidden_layers=2,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            num_labels=10,
        )
        if size == "tiny"
        else dict(num_labels=1000)
    )
    config = transformers.ViTConfig(
        **shape, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    (pixels,), target = _images(size, batch, 32, 224, (10, 1000))
    model = transformers.ViTForImageClassification(config)
    return model, {"pixel_values": pixels}, classification_loss, target


def hf_resnet(size: str = "tiny", batch: int = 4) -> Built:
    """HF ResNet-50 (``microsoft/resnet-50``'s shape); tiny: two bottleneck stages, width 16-32."""
    import transformers

    shape: dict[str, Any] = (
        dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)
        if size == "tiny"
        else dict(num_labels=1000)
    )
    config = transformers.ResNetConfig(**shape)
    (pixels,), target = _images(size, batch, 32, 224, (10, 1000))
    model = transformers.ResNetForImageClassification(config)
    return model, {"pixel_values": pixels}, classification_loss, target


def hf_mixtral(size: str = "tiny", batch: int = 4) -> Built:
    """Mixtral-8x7B's shape (a mixture of experts, top-2 of 8); tiny: 4 experts of width 64."""
    import transformers

    shape: dict[str, Any] = (
        dict(
            num_hidden_layers=2,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            vocab_size=128,
            max_position_embeddings=64,
        )
        if size == "tiny"
        else dict(max_position_embeddings=32768)
    )
    config = transformers.MixtralConfig(**shape, use_cache=False, output_router_logits=False)
    ids, target = _tokens(size, batch, config.vocab_size, (16, 1024))
    return transformers.MixtralForCausalLM(config), {"input_ids": ids}, causal_lm_loss, target


# --- diffusers -----------------------------------------------------------------------------------


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
    return model, inputs, _sample_mse, floats(batch, 3, side, side, salt=1)


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
    return model, inputs, _sample_mse, floats(batch, 4, side, side, salt=1)


# --- the registry --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry: its factory and how to check it."""

    factory: Factory
    library: str
    """What must be installed: torchvision, timm, transformers, diffusers, or torch (nothing)."""
    batchnorm: bool = False
    """Has train-mode BatchNorm: statistics per micro-batch (the pipeline's semantics), so the
    reference runs the same micro-batches."""
    check: Literal["train", "eval"] = "train"
    """``train``: loss, gradients and parameters over 2 steps; ``eval``: ``evaluate`` in eval
    mode against the model in eval mode (for models whose training is random)."""
    devices: str = "h100"
    """The device spec of the 4 devices that the real-size plan is made for."""
    notes: str = ""
    """Why the tolerance holds (or what it must absorb)."""


_FP32 = "fp32, 1e-5 of the largest magnitude"
_BN = _FP32 + "; BatchNorm statistics per micro-batch, as in the reference"
_SUM = _FP32 + "; summation order of the experts' outputs differs only within ulps"

ZOO: dict[str, ZooModel] = {
    "tv-resnet50": ZooModel(tv_resnet50, "torchvision", batchnorm=True, notes=_BN),
    "tv-vit_b_16": ZooModel(tv_vit_b_16, "torchvision", notes=_FP32),
    "tv-densenet121": ZooModel(tv_densenet121, "torchvision", batchnorm=True, notes=_BN),
    "tv-googlenet": ZooModel(tv_googlenet, "torchvision", batchnorm=True, notes=_BN),
    "timm-resnet": ZooModel(timm_resnet, "timm", batchnorm=True, notes=_BN),
    "timm-vit": ZooModel(timm_vit, "timm", notes=_FP32),
    "timm-convnext": ZooModel(timm_convnext, "timm", notes=_FP32),
    "timm-swin": ZooModel(timm_swin, "timm", notes=_FP32),
    "hf-gpt2": ZooModel(hf_gpt2, "transformers", notes=_FP32),
    "hf-bert": ZooModel(hf_bert, "transformers", notes=_FP32),
    "hf-llama": ZooModel(hf_llama, "transformers", notes=_FP32),
    "hf-t5": ZooModel(hf_t5, "transformers", notes=_FP32),
    "hf-vit": ZooModel(hf_vit, "transformers", notes=_FP32),
    "hf-resnet": ZooModel(hf_resnet, "transformers", batchnorm=True, notes=_BN),
    "hf-mixtral": ZooModel(hf_mixtral, "transformers", devices="h100,mem=512GB", notes=_SUM),
    "diffusers-unet2d": ZooModel(diffusers_unet2d, "diffusers", notes=_FP32),
    "diffusers-unet2d-cond": ZooModel(diffusers_unet2d_condition, "diffusers", notes=_FP32),
    "nn-transformer-encoder": ZooModel(native.nn_transformer_encoder, "torch", notes=_FP32),
    "nn-transformer": ZooModel(native.nn_transformer, "torch", notes=_FP32),
    "pipepart-gpt": ZooModel(native.pipepart_gpt, "torch", notes=_FP32),
    "pipepart-skipnet": ZooModel(native.pipepart_skipnet, "torch", notes=_FP32),
    "pipepart-two-tower": ZooModel(native.pipepart_two_tower, "torch", notes=_FP32),
    "pp-mlp-raw": ZooModel(native.pp_mlp_raw, "torch", notes=_FP32),
    "pp-default-arg": ZooModel(native.pp_default_arg, "torch", notes=_FP32),
    "pp-split": ZooModel(native.pp_split, "torch", notes=_FP32),
    "pp-shared": ZooModel(native.pp_shared, "torch", notes=_FP32 + "; shared grads summed"),
    "reversal": ZooModel(native.reversal, "torch", notes=_FP32),
    "func-dropout": ZooModel(native.func_dropout, "torch", check="eval", notes=_FP32),
    "trained-weights": ZooModel(native.trained_weights, "torch", notes=_FP32),
}
