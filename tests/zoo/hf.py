"""Hugging Face transformers models of the zoo (language, vision, mixture of experts), built from configs.

Factories follow [Note: the zoo's factory contract] in `zoo.models`.
"""

from __future__ import annotations

from typing import Any

from partition.models.hf import causal_lm_loss, classification_loss, masked_lm_loss
from zoo.losses import seq2seq_loss
from zoo.native import Built, ints
from zoo.vision import images


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
    return model, inputs, seq2seq_loss, ints(config.vocab_size, batch, n, salt=2)


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
    (pixels,), target = images(size, batch, 32, 224, (10, 1000))
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
    (pixels,), target = images(size, batch, 32, 224, (10, 1000))
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


def hf_bloom(size: str = "tiny", batch: int = 4) -> Built:
    """BLOOM-560M's shape: its GeLU is a custom autograd Function in train mode, and fx cannot
    trace transformers 5's wrapped ``forward`` (the export route keeps the Function opaque)."""
    import transformers

    shape: dict[str, Any] = (
        dict(n_layer=2, hidden_size=32, n_head=4, vocab_size=128)
        if size == "tiny"
        else dict(n_layer=24, hidden_size=1024, n_head=16, vocab_size=250880)
    )
    config = transformers.BloomConfig(
        **shape, use_cache=False, hidden_dropout=0.0, attention_dropout=0.0
    )
    ids, target = _tokens(size, batch, config.vocab_size, (16, 1024))
    return transformers.BloomForCausalLM(config), {"input_ids": ids}, causal_lm_loss, target


def hf_mamba(size: str = "tiny", batch: int = 4) -> Built:
    """Mamba-130M's shape (a state-space model; its train and eval paths differ); tiny: 2 layers
    of width 32, state 4."""
    import transformers

    shape: dict[str, Any] = (
        dict(num_hidden_layers=2, hidden_size=32, state_size=4, vocab_size=128)
        if size == "tiny"
        else dict(num_hidden_layers=24, hidden_size=768, state_size=16, vocab_size=50280)
    )
    config = transformers.MambaConfig(**shape, use_cache=False)
    # Without the mamba_ssm kernels the scan is a Python loop over positions, unrolled by tracing:
    # the real-size plan takes 16 positions (24 layers x 16 steps), not the 2048 of training.
    ids, target = _tokens(size, batch, config.vocab_size, (16, 16))
    return transformers.MambaForCausalLM(config), {"input_ids": ids}, causal_lm_loss, target
