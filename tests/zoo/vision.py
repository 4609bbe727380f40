"""Vision models of the zoo: torchvision and timm, as their libraries build them.

Factories follow [Note: the zoo's factory contract] in `zoo.models`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from zoo.losses import logits_ce
from zoo.native import Built, floats, ints


def images(size: str, batch: int, tiny: int, real: int, classes: tuple[int, int]) -> Any:
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
    inputs, target = images(size, batch, 64, 224, (10, 1000))
    return model, inputs, logits_ce, target


def tv_vit_b_16(size: str = "tiny", batch: int = 4) -> Built:
    """torchvision ViT-B/16; tiny: 2 layers of width 32 on 32x32 images in 8x8 patches."""
    from torchvision.models import vision_transformer as vt

    if size == "tiny":
        model = vt.VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=10)
    else:
        model = vt.vit_b_16()
    inputs, target = images(size, batch, 32, 224, (10, 1000))
    return model, inputs, logits_ce, target


def tv_densenet121(size: str = "tiny", batch: int = 4) -> Built:
    """torchvision DenseNet-121; tiny: two dense blocks of two layers, growth 8."""
    from torchvision.models import densenet

    if size == "tiny":
        model = densenet.DenseNet(8, (2, 2), 16, bn_size=2, num_classes=10)
    else:
        model = densenet.densenet121()
    inputs, target = images(size, batch, 32, 224, (10, 1000))
    return model, inputs, logits_ce, target


def tv_googlenet(size: str = "tiny", batch: int = 4) -> Built:
    """torchvision GoogLeNet (its fixed widths, no auxiliary heads, no dropout); tiny: 32x32."""
    from torchvision.models.googlenet import GoogLeNet

    model = GoogLeNet(
        num_classes=10 if size == "tiny" else 1000, aux_logits=False, init_weights=True, dropout=0.0
    )
    inputs, target = images(size, batch, 32, 224, (10, 1000))
    return model, inputs, logits_ce, target


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
    inputs, target = images(size, batch, 64, 224, (10, 1000))
    return model, inputs, logits_ce, target


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
    inputs, target = images(size, batch, 32, 224, (10, 1000))
    return model, inputs, logits_ce, target


def timm_convnext(size: str = "tiny", batch: int = 4) -> Built:
    """timm ``convnext_tiny``; tiny: one block per stage, widths 16-128 (layer scale kept)."""
    import timm

    if size == "tiny":
        small: dict[str, Any] = dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), num_classes=10)
        model = timm.create_model("convnext_atto", pretrained=False, **small)
    else:
        model = timm.create_model("convnext_tiny", pretrained=False)
    inputs, target = images(size, batch, 32, 224, (10, 1000))
    return model, inputs, logits_ce, target


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
    inputs, target = images(size, batch, 32, 224, (10, 1000))
    return model, inputs, logits_ce, target


def tv_efficientnet(size: str = "tiny", batch: int = 4) -> Built:
    """torchvision EfficientNet-B0 (stochastic depth reads ``self.training``; in-place SiLU);
    tiny: two MBConv stages of width 16-24 at 32x32, stochastic depth 0 (deterministic)."""
    from torchvision.models import efficientnet as tv

    model: nn.Module
    if size == "tiny":
        setting = [tv.MBConvConfig(1, 3, 1, 16, 16, 1), tv.MBConvConfig(6, 3, 2, 16, 24, 2)]
        model = tv.EfficientNet(setting, dropout=0.0, stochastic_depth_prob=0.0, num_classes=10)
    else:
        model = tv.efficientnet_b0(dropout=0.0, stochastic_depth_prob=0.0)
    inputs, target = images(size, batch, 32, 224, (10, 1000))
    return model, inputs, logits_ce, target


def tv_resnet18_eval(size: str = "tiny", batch: int = 4) -> Built:
    """torchvision ResNet-18 put in eval mode by its factory, as for fine-tuning with frozen
    BatchNorm statistics; tiny: one basic block per stage at 32x32."""
    from torchvision.models import resnet

    if size == "tiny":
        model = resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)
    else:
        model = resnet.resnet18()
    inputs, target = images(size, batch, 32, 224, (10, 1000))
    return model.eval(), inputs, logits_ce, target


def timm_efficientnet(size: str = "tiny", batch: int = 4) -> Built:
    """timm ``efficientnet_b0`` (BatchNormAct2d: BatchNorm traced as a function); tiny: timm's
    ``tinynet_e``, the same EfficientNet class at width 0.51, depth 0.6, 32x32."""
    import timm

    name = "tinynet_e" if size == "tiny" else "efficientnet_b0"
    model = timm.create_model(
        name, pretrained=False, num_classes=10 if size == "tiny" else 1000, drop_rate=0.0
    )
    inputs, target = images(size, batch, 32, 224, (10, 1000))
    return model, inputs, logits_ce, target


def timm_mobilenetv3(size: str = "tiny", batch: int = 4) -> Built:
    """timm ``mobilenetv3_large_100``; tiny: ``mobilenetv3_small_050`` at 32x32."""
    import timm

    name = "mobilenetv3_small_050" if size == "tiny" else "mobilenetv3_large_100"
    model = timm.create_model(
        name, pretrained=False, num_classes=10 if size == "tiny" else 1000, drop_rate=0.0
    )
    inputs, target = images(size, batch, 32, 224, (10, 1000))
    return model, inputs, logits_ce, target
