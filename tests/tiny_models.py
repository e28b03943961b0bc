"""Tiny random targets (Llama, Qwen3, Qwen3.5 hybrid) and drafts for CPU tests."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from dspark import DSparkDraftModel


def tiny_llama(seed: int = 0, vocab_size: int = 128, num_layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.1,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def tiny_qwen3(seed: int = 0, vocab_size: int = 160, num_layers: int = 5) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        initializer_range=0.1,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return Qwen3ForCausalLM(config).eval()


# Hybrid targets: three Gated DeltaNet layers, then a full-attention one.
HYBRID_SHAPE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=2,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    max_position_embeddings=512,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)

TINY_EXPERTS = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)


def tiny_qwen35(seed: int = 0, vocab_size: int = 128, **overrides):
    """A hybrid Gated-DeltaNet + attention target (stateful); `overrides` change its config."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    torch.manual_seed(seed)
    config = Qwen3_5TextConfig(**{**HYBRID_SHAPE, "vocab_size": vocab_size, **overrides})
    return Qwen3_5ForCausalLM(config).eval()


def tiny_qwen35_multimodal(seed: int = 0):
    """Qwen3.5 as its checkpoints ship: the hybrid text model inside the image-text-to-text wrapper (a small vision
    tower beside it; our loops feed it text only)."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    torch.manual_seed(seed)
    width = HYBRID_SHAPE["hidden_size"]
    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=width)
    config = Qwen3_5Config(text_config={**HYBRID_SHAPE, "vocab_size": 128}, vision_config=vision)
    return Qwen3_5ForConditionalGeneration(config).eval()


def tiny_qwen35_moe(seed: int = 0):
    """A hybrid Qwen3.5 target whose MLPs are mixtures of experts (Qwen3.5-MoE: Gated DeltaNet layers as Qwen3.5's)."""
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    torch.manual_seed(seed)
    return Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**HYBRID_SHAPE, vocab_size=128, **TINY_EXPERTS)).eval()


def tiny_qwen3_next(seed: int = 0):
    """A hybrid target whose Gated DeltaNet fuses its projections (in_proj_qkvz, in_proj_ba) and whose MLPs are
    mixtures of experts."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    torch.manual_seed(seed)
    return Qwen3NextForCausalLM(Qwen3NextConfig(**HYBRID_SHAPE, vocab_size=128, **TINY_EXPERTS)).eval()


def tiny_draft(target, seed: int = 1, **kwargs) -> DSparkDraftModel:
    """A random draft for `target`; kwargs go to `DSparkDraftModel.from_target`."""
    torch.manual_seed(seed)
    kwargs.setdefault("block_size", 4)
    draft = DSparkDraftModel.from_target(target, **kwargs).eval()
    if draft.markov_head is not None:
        # A trained head is not zero; give it weight so the Markov path changes the proposals.
        torch.nn.init.normal_(draft.markov_head.markov_w2.weight, std=0.5)
    return draft


WORDS = (
    "<unk> <pad> <eos> user assistant : . , ? ! the a an of to in and is are what how why you your it this that "
    "write explain describe python function code number math list give two three one for with on as be can do "
    "about story email travel blog post plan help me i make from by"
).split()


def word_tokenizer():
    """A 64-word lowercase word-level tokenizer with a one-line chat template; unknown words map to <unk>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocabulary = {word: index for index, word in enumerate(WORDS)}
    for filler in range(len(vocabulary), 64):
        vocabulary[f"<extra{filler}>"] = filler
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    )
    tokenizer.chat_template = (
        "{% for message in messages %}user : {{ message['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    return tokenizer


def save_chat_target(folder, seed: int = 5):
    """A tiny Llama with a peaked output distribution and the word tokenizer, saved to `folder` like a real
    checkpoint (eos/pad set in its generation config). Returns (target, tokenizer)."""
    tokenizer = word_tokenizer()
    target = tiny_llama(seed=seed, vocab_size=64)
    with torch.no_grad():
        target.lm_head.weight.mul_(4.0)  # peaked next-token distributions: drafts get something to learn
    target.generation_config.eos_token_id = tokenizer.eos_token_id
    target.generation_config.pad_token_id = tokenizer.pad_token_id
    target.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return target, tokenizer
