"""Models whose train and eval graphs differ, planned both modes together and trained on 2 ranks.

Issue 18: the planner picked cuts on one mode's graph and the pairing refused them afterwards —
HF ResNet put in eval mode by its factory (``num_batches_tracked`` read in train mode only), HF
Mamba (train and eval paths differ), torchvision EfficientNet (a cut right after an in-place
SiLU), Inception v3 at 75 px (its train-mode aux head cannot run: ``modes="eval"``). Each is
planned here on meta (both modes, or the one asked), then trained by `run_pipeline` on 2 gloo
ranks (1F1B, 2 micro-batches, 2 SGD steps) and checked against the factory's model run eagerly
in one process: the loss of each step, every gradient, every parameter and buffer after the
steps (``--check``, 1e-5 relative).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from partition import plan_model
from partition.devices import parse_devices
from partition.models.registry import build_meta_model
from partition.modes.modal import ModalStage
from pipeline.launch.run import RunOptions, run_pipeline
from pipeline.runtime.layout import layout
from pipeline.runtime.pipeline import PipelineOptions

MODULE = "tests.pipeline.test_mode_models"


def _ce(out: Any, target: Tensor) -> Tensor:
    logits = getattr(out, "logits", out)
    logits = logits[0] if isinstance(logits, (tuple, list)) else logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def _images(pixels: int, classes: int = 10) -> tuple[tuple[Tensor], Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, pixels, pixels, generator=g)
    return (images,), torch.randint(0, classes, (4,), generator=g)


def hf_resnet_eval() -> Any:
    """HF ResNet, frozen BatchNorm (eval mode from the factory): traced by export, whose train
    graph alone updates ``num_batches_tracked``."""
    import transformers

    config = transformers.ResNetConfig(
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        layer_type="bottleneck",
        num_labels=10,
    )
    inputs, target = _images(32)
    return transformers.ResNetForImageClassification(config).eval(), inputs, _ce, target


def hf_mamba() -> Any:
    """HF Mamba (a state-space model without its CUDA kernels: train and eval paths differ)."""
    import transformers

    config = transformers.MambaConfig(
        vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=3, expand=2,
        conv_kernel=4, time_step_rank=4, use_cache=False,
    )  # fmt: skip
    ids = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(1))
    return transformers.MambaForCausalLM(config), (ids[:, :-1],), _ce, ids[:, 1:]


def tv_efficientnet() -> Any:
    """torchvision EfficientNet: ``stochastic_depth(..., self.training)`` after an in-place SiLU
    (probability 0: deterministic, yet the two graphs differ in that argument)."""
    from torchvision.models import efficientnet as tv

    setting = [tv.MBConvConfig(1, 3, 1, 16, 16, 1), tv.MBConvConfig(6, 3, 2, 16, 24, 2)]
    model = tv.EfficientNet(setting, dropout=0.0, stochastic_depth_prob=0.0, num_classes=10)
    inputs, target = _images(32)
    return model, inputs, _ce, target


def tv_inception_eval() -> Any:
    """torchvision Inception v3 in eval mode at 75 px: the train-mode aux head cannot run."""
    from torchvision.models import inception_v3

    model = inception_v3(num_classes=10, aux_logits=True, init_weights=False).eval()
    inputs, target = _images(75)
    return model, inputs, _ce, target


def _plan_and_check(name: str, modes: str = "both") -> tuple[Any, Any]:
    built = build_meta_model(globals()[name])
    plan = plan_model(
        built.model,
        built.args or (),
        built.kwargs,
        devices=parse_devices("cpu", 2),
        microbatches=2,
        modes=modes,  # type: ignore[arg-type]
    )
    result = run_pipeline(
        f"{MODULE}:{name}",
        RunOptions(ranks=2, steps=2, lr=1e-2, check=True, timeout=240, pipeline=PipelineOptions()),
        plan=plan,
    )
    assert result is not None and result.check is not None
    check = result.check
    assert check.passed, check
    assert max(check.loss, check.grads, check.params, check.buffers) <= 1e-5, check
    return plan, result


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("name", "modes"),
    [
        ("hf_resnet_eval", ("eval", "train")),
        ("hf_mamba", ("train", "eval")),
        ("tv_efficientnet", ("train", "eval")),
    ],
)
def test_a_model_with_two_modes_plans_both_and_trains_exactly(
    name: str, modes: tuple[str, ...]
) -> None:
    plan, _ = _plan_and_check(name)
    assert plan.model.modes == modes


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_model_whose_other_mode_cannot_run_trains_in_its_own_mode_alone() -> None:
    plan, _ = _plan_and_check("tv_inception_eval", modes="eval")
    assert plan.model.modes == ("eval",)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hf_mamba", "tv_efficientnet", "hf_resnet_eval"])
def test_on_three_ranks_every_stage_carries_over_to_the_other_mode(name: str) -> None:
    """Mamba on 3 ranks was ``stage 1 has no nodes in eval mode``; every rank's layout (both
    graphs of every stage, paired) builds from the plan."""
    built = build_meta_model(globals()[name])
    plan = plan_model(
        built.model, built.args or (), built.kwargs, devices=parse_devices("cpu", 3), microbatches=2
    )
    stages = layout(built, plan, PipelineOptions(), 3).stages
    assert len(stages) == 3 and len(plan.model.modes) == 2
    assert all(isinstance(s, ModalStage) and s.other is not None for s in stages)
