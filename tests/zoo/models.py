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
from typing import Literal

from zoo import diffusion, hf, native, vision
from zoo.native import Built

__all__ = ["ZOO", "Factory", "ZooModel"]

Factory = Callable[..., Built]


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
_EVAL_BN = _FP32 + "; BatchNorm frozen (eval mode, running statistics), trained in eval mode"
_SUM = _FP32 + "; summation order of the experts' outputs differs only within ulps"

ZOO: dict[str, ZooModel] = {
    "tv-resnet50": ZooModel(vision.tv_resnet50, "torchvision", batchnorm=True, notes=_BN),
    "tv-vit_b_16": ZooModel(vision.tv_vit_b_16, "torchvision", notes=_FP32),
    "tv-densenet121": ZooModel(vision.tv_densenet121, "torchvision", batchnorm=True, notes=_BN),
    "tv-googlenet": ZooModel(vision.tv_googlenet, "torchvision", batchnorm=True, notes=_BN),
    "tv-efficientnet": ZooModel(vision.tv_efficientnet, "torchvision", batchnorm=True, notes=_BN),
    "tv-resnet18-eval": ZooModel(vision.tv_resnet18_eval, "torchvision", notes=_EVAL_BN),
    "timm-resnet": ZooModel(vision.timm_resnet, "timm", batchnorm=True, notes=_BN),
    "timm-vit": ZooModel(vision.timm_vit, "timm", notes=_FP32),
    "timm-convnext": ZooModel(vision.timm_convnext, "timm", notes=_FP32),
    "timm-swin": ZooModel(vision.timm_swin, "timm", notes=_FP32),
    "timm-efficientnet": ZooModel(vision.timm_efficientnet, "timm", batchnorm=True, notes=_BN),
    "timm-mobilenetv3": ZooModel(vision.timm_mobilenetv3, "timm", batchnorm=True, notes=_BN),
    "hf-gpt2": ZooModel(hf.hf_gpt2, "transformers", notes=_FP32),
    "hf-bert": ZooModel(hf.hf_bert, "transformers", notes=_FP32),
    "hf-llama": ZooModel(hf.hf_llama, "transformers", notes=_FP32),
    "hf-t5": ZooModel(hf.hf_t5, "transformers", notes=_FP32),
    "hf-vit": ZooModel(hf.hf_vit, "transformers", notes=_FP32),
    "hf-resnet": ZooModel(hf.hf_resnet, "transformers", batchnorm=True, notes=_BN),
    "hf-bloom": ZooModel(hf.hf_bloom, "transformers", notes=_FP32),
    "hf-mamba": ZooModel(hf.hf_mamba, "transformers", notes=_FP32),
    "hf-mixtral": ZooModel(hf.hf_mixtral, "transformers", devices="h100,mem=512GB", notes=_SUM),
    "diffusers-unet2d": ZooModel(diffusion.diffusers_unet2d, "diffusers", notes=_FP32),
    "diffusers-unet2d-cond": ZooModel(
        diffusion.diffusers_unet2d_condition, "diffusers", notes=_FP32
    ),
    "nn-transformer-encoder": ZooModel(native.nn_transformer_encoder, "torch", notes=_FP32),
    "nn-transformer": ZooModel(native.nn_transformer, "torch", notes=_FP32),
    "nn-sequential": ZooModel(native.nn_sequential, "torch", notes=_FP32),
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
