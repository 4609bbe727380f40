"""The bundled models: parameter counts, causality, shapes and losses against plain torch."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import partition.examples as public
from partition.errors import PlanError
from partition.models import examples
from partition.models.examples import (
    GPT_SIZES,
    GPTConfig,
    gpt,
    lm_loss,
    skipnet,
    two_tower,
    two_tower_loss,
)


@pytest.mark.parametrize("size", list(GPT_SIZES))
@pytest.mark.parametrize("tied", [False, True])
def test_the_parameter_count_is_the_models(size: str, tied: bool) -> None:
    with torch.device("meta"):  # 10 B parameters, no memory
        model, (idx,), _ = gpt(size, batch=2, seq=4, tie_weights=tied)
    assert model.config.num_parameters == sum(p.numel() for p in model.parameters())
    assert idx.device.type == "meta" and idx.shape == (2, 4) and idx.dtype == torch.long
    assert (model.lm_head.weight is model.wte.weight) == tied


def test_gpt_small_has_the_published_shape() -> None:
    # GPT-2 small with the vocabulary padded to 50304, untied: 124.5 M + 38.6 M of LM head
    c = GPT_SIZES["small"]
    embeddings = 50304 * 768 + 1024 * 768
    per_block = 12 * 768 * 768 + 13 * 768  # attention 4 d^2 + MLP 8 d^2, biases and LayerNorms
    assert c.num_parameters == embeddings + 12 * per_block + 2 * 768 + 50304 * 768


def test_a_token_changes_no_earlier_logit() -> None:
    model, (idx,), _ = gpt("toy", batch=2, seq=10)
    model.eval()
    logits = model(idx)
    assert logits.shape == (2, 10, 96)
    changed = idx.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 96
    again = model(changed)
    assert torch.equal(again[:, :6], logits[:, :6])  # causal: the past does not see the future
    assert not torch.allclose(again[:, 6:], logits[:, 6:])


def test_the_lm_loss_is_the_mean_negative_log_likelihood() -> None:
    logits, targets = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))
    logp = logits.log_softmax(-1)
    by_hand = -torch.stack([logp[b, t, targets[b, t]] for b in range(2) for t in range(3)]).mean()
    assert torch.allclose(lm_loss(logits, targets), by_hand)


def test_gpt_options_and_their_errors() -> None:
    model, (idx,), _ = gpt("toy", batch=3, layers=2)
    assert len(model.h) == 2 and idx.shape == (3, 16)  # seq defaults to the block size
    config = dataclasses.replace(GPT_SIZES["toy"], n_layer=1)
    assert len(gpt(config)[0].h) == 1
    with pytest.raises(PlanError, match="unknown GPT size 'huge'; sizes: toy, small"):
        gpt("huge")
    with pytest.raises(PlanError, match="seq 17 must be between 1 and the block size 16"):
        gpt("toy", seq=17)
    with pytest.raises(PlanError, match="n_embd 10 must divide by n_head 3"):
        GPTConfig(n_embd=10, n_head=3)
    with pytest.raises(PlanError, match=r"GPTConfig\.n_layer must be at least 1, got 0"):
        GPTConfig(n_layer=0)


def test_skipnet_adds_its_first_activation_back_at_the_end() -> None:
    model, (x,), loss = skipnet(batch=3, width=4, depth=2)
    skip = torch.tanh(model.inp(x))
    h = skip
    for layer in model.layers:
        h = torch.relu(layer(h)) + 0.5 * h
    assert torch.equal(model(x), model.out(h + skip)) and x.shape == (3, 4)
    assert loss is F.mse_loss


def test_two_tower_mixes_two_inputs_into_two_outputs() -> None:
    model, (a, b), loss = two_tower(batch=5, width=3)
    y, z = model(a, b)
    assert y.shape == (5, 3) and z.shape == (5, 1)
    target = torch.randn(5, 3)
    assert torch.allclose(loss((y, z), target), ((y - target) ** 2).mean() + (z**2).mean())
    assert loss is two_tower_loss


def test_the_public_path_is_the_same_module() -> None:
    assert public.gpt is examples.gpt and set(public.__all__) == set(examples.__all__)
    assert all(getattr(public, name) is getattr(examples, name) for name in examples.__all__)


def test_on_meta_the_models_allocate_nothing() -> None:
    with torch.device("meta"):
        for model, inputs, _ in (skipnet(batch=2), two_tower(batch=2)):
            assert all(p.device.type == "meta" for p in model.parameters())
            assert all(x.device.type == "meta" for x in inputs)
