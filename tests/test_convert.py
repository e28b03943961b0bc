"""`dspark convert`: upstream z-lab / DeepSpec / TorchSpec checkpoints import exactly, export back, and fail clearly.

Each upstream layout is rebuilt here from tiny random tensors with the upstream key names and config fields, and the
imported draft is checked against a plain-torch re-implementation of the DFlash/DSpark forward written from the
upstream state dict, so a key-mapping mistake (swapped k/v, wrong fc, wrong norm) fails the test.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny_models import tiny_draft, tiny_qwen3
from transformers import AutoModel, Qwen3Config

import dspark.convert as convert_module
from dspark.convert import convert, detect_format, export_checkpoint, load_checkpoint

# Shapes of tests/tiny_models.tiny_qwen3: hidden 64, 4 heads / 2 KV heads of 16, vocab 160, 5 layers.
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE, VOCAB, TARGET_DEPTH = 64, 4, 2, 16, 96, 160, 5
LAYER_IDS = [1, 3]
EPS = 1e-6
THETA = 10000.0
MASK = VOCAB - 1
RANK = 8


# ----------------------------------------------------------------------------------------------------------------
# Upstream checkpoints built from scratch
# ----------------------------------------------------------------------------------------------------------------


def random_backbone(num_layers: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A DFlash backbone state dict in the upstream (z-lab / DeepSpec) key names, with non-trivial norms."""
    gen = torch.Generator().manual_seed(seed)

    def weight(*shape, scale=0.15):
        return torch.randn(*shape, generator=gen) * scale

    def norm(size):
        return 1.0 + 0.2 * torch.randn(size, generator=gen)

    tensors = {
        "fc.weight": weight(HIDDEN, len(LAYER_IDS) * HIDDEN),
        "hidden_norm.weight": norm(HIDDEN),
        "norm.weight": norm(HIDDEN),
    }
    for i in range(num_layers):
        prefix = f"layers.{i}."
        tensors.update(
            {
                prefix + "input_layernorm.weight": norm(HIDDEN),
                prefix + "post_attention_layernorm.weight": norm(HIDDEN),
                prefix + "self_attn.q_proj.weight": weight(HEADS * HEAD_DIM, HIDDEN),
                prefix + "self_attn.k_proj.weight": weight(KV_HEADS * HEAD_DIM, HIDDEN),
                prefix + "self_attn.v_proj.weight": weight(KV_HEADS * HEAD_DIM, HIDDEN),
                prefix + "self_attn.o_proj.weight": weight(HIDDEN, HEADS * HEAD_DIM),
                prefix + "self_attn.q_norm.weight": norm(HEAD_DIM),
                prefix + "self_attn.k_norm.weight": norm(HEAD_DIM),
                prefix + "mlp.gate_proj.weight": weight(INTERMEDIATE, HIDDEN),
                prefix + "mlp.up_proj.weight": weight(INTERMEDIATE, HIDDEN),
                prefix + "mlp.down_proj.weight": weight(HIDDEN, INTERMEDIATE),
            }
        )
    return tensors


def dspark_heads(seed: int = 1, gated: bool = False, confidence: bool = True) -> dict[str, torch.Tensor]:
    """DeepSpec's own embed_tokens / lm_head copies plus the Markov and confidence heads."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=gen),
        "lm_head.weight": torch.randn(VOCAB, HIDDEN, generator=gen) * 0.2,
        "markov_head.markov_w1.weight": torch.randn(VOCAB, RANK, generator=gen),
        "markov_head.markov_w2.weight": torch.randn(VOCAB, RANK, generator=gen) * 0.5,
    }
    if gated:
        tensors["markov_head.gate_proj.weight"] = torch.randn(RANK, HIDDEN + RANK, generator=gen) * 0.3
        tensors["markov_head.gate_proj.bias"] = torch.randn(RANK, generator=gen) * 0.3
    if confidence:
        tensors["confidence_head.proj.weight"] = torch.randn(1, HIDDEN + RANK, generator=gen) * 0.3
        tensors["confidence_head.proj.bias"] = torch.randn(1, generator=gen)
    return tensors


def qwen3_config_fields(num_layers: int = 2) -> dict:
    return {
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": num_layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "rms_norm_eps": EPS,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "rope_theta": THETA,
        "rope_scaling": None,
        "max_position_embeddings": 512,
        "layer_types": ["full_attention"] * num_layers,
        "sliding_window": None,
        "use_sliding_window": False,
        "vocab_size": VOCAB,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def zlab_config(num_layers: int = 2) -> dict:
    return {
        "architectures": ["DFlashDraftModel"],
        "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
        "model_type": "qwen3",
        "block_size": 4,
        "num_target_layers": TARGET_DEPTH,
        # Stale top-level copies: the nested dflash_config must win.
        "mask_token_id": 0,
        "target_layer_ids": [0, 0],
        "dflash_config": {"mask_token_id": MASK, "target_layer_ids": LAYER_IDS},
        **qwen3_config_fields(num_layers),
    }


def deepspec_config(num_layers: int = 2, gated: bool = False, confidence: bool = True) -> dict:
    config = {
        "architectures": ["Qwen3DSparkModel"],
        "model_type": "qwen3",
        **qwen3_config_fields(num_layers),
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "num_target_layers": TARGET_DEPTH,
        "block_size": 4,
        "mask_token_id": MASK,
        "target_layer_ids": LAYER_IDS,
        "num_anchors": 512,
        "enable_confidence_head": confidence,
        "markov_rank": RANK,
        "markov_head_type": "gated" if gated else "vanilla",
    }
    if confidence:
        config["confidence_head_with_markov"] = True
    return config


def torchspec_config(num_layers: int = 2) -> dict:
    """torchspec/config/dspark_draft_config.json: no head_dim, no block_size, num_target_layers = layers captured."""
    return {
        "architectures": ["Qwen3DSparkModel"],
        "model_type": "qwen3_dspark",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": num_layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "rms_norm_eps": EPS,
        "max_position_embeddings": 512,
        "rope_theta": THETA,
        "num_target_layers": len(LAYER_IDS),
        "target_hidden_size": HIDDEN,
        "target_num_hidden_layers": TARGET_DEPTH,
        "target_layer_ids": LAYER_IDS,
        "mask_token_id": MASK,
        "markov_rank": RANK,
        "markov_head_type": "vanilla",
        "enable_confidence_head": True,
        "confidence_head_with_markov": True,
        "tie_word_embeddings": False,
        "draft_vocab_size": VOCAB,
        "_torchspec_version": "0.3.0",
    }


def torchspec_names(tensors: dict[str, torch.Tensor], midlayer: bool = False, prefix: str = "") -> dict:
    """TorchSpec's internal module names (keymap.py): context_proj / context_norm / final_norm / midlayer."""
    renamed = {}
    for key, tensor in tensors.items():
        name = key
        for ours, theirs in (("fc.", "context_proj."), ("hidden_norm.", "context_norm."), ("norm.", "final_norm.")):
            if key.startswith(ours):
                name = theirs + key[len(ours) :]
        if midlayer and key.startswith("layers.0."):
            name = "midlayer." + key[len("layers.0.") :]
        renamed[prefix + name] = tensor
    return renamed


def write_checkpoint(folder, config: dict, tensors: dict[str, torch.Tensor]):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(folder / "model.safetensors"))
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Independent reference: the DFlash/DSpark backbone in plain torch, straight from the upstream state dict
# ----------------------------------------------------------------------------------------------------------------


def rms_norm(x, weight):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight


def rotate(x, positions):
    """Rotate-half RoPE with base THETA at absolute positions [T]; x: [B, heads, T, d]."""
    dim = x.shape[-1]
    inv_freq = 1.0 / THETA ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = positions[:, None].float() * inv_freq[None]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    first, second = x[..., : dim // 2], x[..., dim // 2 :]
    return x * cos + torch.cat([-second, first], -1) * sin


def reference_hidden(sd, block, features, positions, num_layers=2):
    """fc -> RMSNorm context; per layer Q from the block, K/V from [context; block] with shared projections."""
    batch, slots, _ = block.shape
    context = rms_norm(features @ sd["fc.weight"].T, sd["hidden_norm.weight"])
    length = context.shape[1]
    hidden = block
    for i in range(num_layers):
        p = f"layers.{i}."
        x = rms_norm(hidden, sd[p + "input_layernorm.weight"])
        kv_input = torch.cat([context, x], dim=1)
        q = (x @ sd[p + "self_attn.q_proj.weight"].T).view(batch, slots, HEADS, HEAD_DIM).transpose(1, 2)
        k = (kv_input @ sd[p + "self_attn.k_proj.weight"].T).view(batch, -1, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = (kv_input @ sd[p + "self_attn.v_proj.weight"].T).view(batch, -1, KV_HEADS, HEAD_DIM).transpose(1, 2)
        q = rotate(rms_norm(q, sd[p + "self_attn.q_norm.weight"]), positions[length:])
        k = rotate(rms_norm(k, sd[p + "self_attn.k_norm.weight"]), positions)
        k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
        v = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM), dim=-1)  # no mask: non-causal
        attended = (weights @ v).transpose(1, 2).reshape(batch, slots, HEADS * HEAD_DIM)
        hidden = hidden + attended @ sd[p + "self_attn.o_proj.weight"].T
        x = rms_norm(hidden, sd[p + "post_attention_layernorm.weight"])
        gate, up = x @ sd[p + "mlp.gate_proj.weight"].T, x @ sd[p + "mlp.up_proj.weight"].T
        hidden = hidden + (F.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    return rms_norm(hidden, sd["norm.weight"])


def reference_markov_bias(sd, previous, hidden, gated=False):
    embedded = sd["markov_head.markov_w1.weight"][previous]
    if gated:
        gate_in = torch.cat([hidden, embedded], -1)
        gate = torch.sigmoid(gate_in @ sd["markov_head.gate_proj.weight"].T + sd["markov_head.gate_proj.bias"])
        embedded = gate * embedded
    return embedded @ sd["markov_head.markov_w2.weight"].T


def block_inputs(context_length=6, seed=7):
    gen = torch.Generator().manual_seed(seed)
    anchor = torch.tensor([17])
    block_ids = torch.tensor([[17, MASK, MASK, MASK]])
    features = torch.randn(1, context_length, len(LAYER_IDS) * HIDDEN, generator=gen)
    positions = torch.arange(context_length + block_ids.shape[1])
    return anchor, block_ids, features, positions


def greedy(logits):
    return logits, logits.argmax(dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# Import: each upstream layout against the reference
# ----------------------------------------------------------------------------------------------------------------


def test_zlab_dflash_import_matches_reference(tmp_path):
    sd = random_backbone()
    folder = write_checkpoint(tmp_path / "zlab", zlab_config(), sd)
    assert detect_format(folder) == "zlab-dflash"
    draft = load_checkpoint(folder)
    config = draft.config
    assert (config.sample_from_anchor, config.markov_rank, config.enable_confidence_head) == (False, 0, False)
    assert (config.has_embed_tokens, config.has_lm_head) == (False, False)
    assert config.mask_token_id == MASK and config.target_layer_ids == LAYER_IDS  # dflash_config won
    assert config.num_target_layers == TARGET_DEPTH and config.block_size == 4 and config.num_draft_tokens == 3
    assert config.rope_parameters["rope_theta"] == THETA

    target = tiny_qwen3()
    draft.bind_target(target)
    anchor, block_ids, features, positions = block_inputs()
    block = target.get_input_embeddings()(block_ids)  # no embed_tokens: the block uses the target's embedding
    torch.testing.assert_close(draft.embed_block(anchor), block)
    with torch.no_grad():
        out = draft(block, features, position_ids=positions[None])
        logits = draft.block_logits(out.draft_hidden_states)
    expected = reference_hidden(sd, block, features, positions)
    torch.testing.assert_close(out.draft_hidden_states, expected[:, 1:], atol=1e-5, rtol=1e-5)  # DFlash: slots 1..
    torch.testing.assert_close(logits, expected[:, 1:] @ target.lm_head.weight.T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("gated", [False, True], ids=["vanilla", "gated"])
def test_deepspec_import_matches_reference(tmp_path, gated):
    sd = {**random_backbone(seed=2), **dspark_heads(gated=gated)}
    folder = write_checkpoint(tmp_path / "deepspec", deepspec_config(gated=gated), sd)
    assert detect_format(folder) == "deepspec"
    draft = load_checkpoint(folder)
    config = draft.config
    assert config.sample_from_anchor is True and config.num_draft_tokens == 4
    assert (config.has_embed_tokens, config.has_lm_head) == (True, True)
    assert (config.markov_rank, config.markov_head_type) == (RANK, "gated" if gated else "vanilla")
    assert config.enable_confidence_head and config.confidence_head_with_markov

    anchor, block_ids, features, positions = block_inputs()
    block = sd["embed_tokens.weight"][block_ids]  # DeepSpec ships its own embedding copy
    torch.testing.assert_close(draft.embed_block(anchor), block)
    with torch.no_grad():
        out = draft(block, features, position_ids=positions[None])
        logits = draft.block_logits(out.draft_hidden_states)
        drafted = draft.draft_block(out.draft_hidden_states, anchor, greedy)
    expected = reference_hidden(sd, block, features, positions)
    torch.testing.assert_close(out.draft_hidden_states, expected, atol=1e-5, rtol=1e-5)  # DSpark: every slot
    base = expected @ sd["lm_head.weight"].T
    torch.testing.assert_close(logits, base, atol=1e-4, rtol=1e-4)

    # Markov sampling step and confidence head, left to right from the anchor.
    previous, tokens, confidences = anchor, [], []
    for slot in range(4):
        hidden = expected[:, slot]
        embedded = sd["markov_head.markov_w1.weight"][previous]
        feature = torch.cat([hidden, embedded], -1)
        confidences.append(
            torch.sigmoid(feature @ sd["confidence_head.proj.weight"].T + sd["confidence_head.proj.bias"])
        )
        previous = (base[:, slot] + reference_markov_bias(sd, previous, hidden, gated)).argmax(-1)
        tokens.append(previous)
    assert torch.equal(drafted.tokens, torch.stack(tokens, 1))
    torch.testing.assert_close(drafted.confidence, torch.cat(confidences, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["internal-names", "vllm-prefix", "midlayer"])
def test_torchspec_import_matches_reference(tmp_path, variant):
    num_layers = 1 if variant == "midlayer" else 2
    sd = {**random_backbone(num_layers, seed=3), **dspark_heads(seed=4)}
    sd.pop("lm_head.weight")  # TorchSpec drafts keep the target's lm_head outside the checkpoint
    stored = torchspec_names(sd, midlayer=variant == "midlayer", prefix="model." if variant == "vllm-prefix" else "")
    assert "context_proj.weight" in stored or "model.context_proj.weight" in stored
    config = torchspec_config(num_layers)
    if variant == "vllm-prefix":
        config["model_type"] = "qwen3"  # as rewritten by TorchSpec's tools/convert_to_hf.py
    folder = write_checkpoint(tmp_path / "torchspec", config, stored)
    assert detect_format(folder) == "torchspec"

    with pytest.raises(ValueError, match=r"no block_size.*--block-size N"):
        load_checkpoint(folder)
    draft = load_checkpoint(folder, block_size=4)
    assert draft.config.sample_from_anchor is True
    assert draft.config.num_target_layers == TARGET_DEPTH  # from target_num_hidden_layers, not num_target_layers
    assert (draft.config.has_embed_tokens, draft.config.has_lm_head) == (True, False)

    target = tiny_qwen3()
    draft.bind_target(target)
    anchor, block_ids, features, positions = block_inputs()
    block = sd["embed_tokens.weight"][block_ids]
    torch.testing.assert_close(draft.embed_block(anchor), block)
    with torch.no_grad():
        out = draft(block, features, position_ids=positions[None])
        logits = draft.block_logits(out.draft_hidden_states)
    expected = reference_hidden(sd, block, features, positions, num_layers)
    torch.testing.assert_close(out.draft_hidden_states, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, expected @ target.lm_head.weight.T, atol=1e-4, rtol=1e-4)


def test_torchspec_dflash_export_uses_the_dflash_convention(tmp_path):
    """TorchSpec's plain DFlash drafts: model_type "dflash"; target layers derived from its own default spacing."""
    config = torchspec_config()
    config.update(architectures=["DFlashDraftModel"], model_type="dflash", block_size=4, markov_rank=0)
    del config["target_layer_ids"], config["enable_confidence_head"], config["confidence_head_with_markov"]
    config["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}  # copied from a target; TorchSpec ignores it
    sd = random_backbone(seed=5)
    sd["embed_tokens.weight"] = torch.randn(VOCAB, HIDDEN)
    folder = write_checkpoint(tmp_path / "ts-dflash", config, torchspec_names(sd))
    assert detect_format(folder) == "torchspec"
    imported = convert_module.import_checkpoint(folder)
    draft = imported.draft
    assert draft.config.sample_from_anchor is False and draft.config.markov_rank == 0
    assert draft.config.target_layer_ids == [1, 2]  # 2 layers of a 5-layer target: from 1 to depth - 3
    assert draft.config.rope_parameters == {"rope_type": "default", "rope_theta": THETA}
    assert any("ignored rope_scaling" in note for note in imported.notes)


def test_pytorch_bin_weights_are_read(tmp_path):
    sd = random_backbone()
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(zlab_config()))
    torch.save(sd, folder / "pytorch_model.bin")
    draft = load_checkpoint(folder)
    assert torch.equal(draft.fc.weight, sd["fc.weight"])
    (folder / "pytorch_model.bin").write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: cannot read this PyTorch weights file"):
        load_checkpoint(folder)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda sd: sd.update(
            {
                "layers.0.self_attn.k_proj.weight": sd["layers.0.self_attn.v_proj.weight"],
                "layers.0.self_attn.v_proj.weight": sd["layers.0.self_attn.k_proj.weight"],
            }
        ),
        lambda sd: sd.update({"fc.weight": sd["fc.weight"].flip(1)}),
        lambda sd: sd.update({"hidden_norm.weight": sd["norm.weight"], "norm.weight": sd["hidden_norm.weight"]}),
    ],
    ids=["swapped-k-v", "permuted-fc", "swapped-norms"],
)
def test_reference_catches_mapping_mistakes(tmp_path, corrupt):
    """The reference is sensitive enough: loading a mis-mapped state dict must not match it."""
    sd = random_backbone()
    wrong = dict(sd)
    corrupt(wrong)
    draft = load_checkpoint(write_checkpoint(tmp_path / "wrong", zlab_config(), wrong))
    _, block_ids, features, positions = block_inputs()
    block = tiny_qwen3().get_input_embeddings()(block_ids)
    with torch.no_grad():
        hidden = draft(block, features, position_ids=positions[None]).draft_hidden_states
    assert not torch.allclose(hidden, reference_hidden(sd, block, features, positions)[:, 1:], atol=1e-3)


def test_explicit_sample_from_anchor_field_and_override_win(tmp_path):
    config = deepspec_config()
    config["sample_from_anchor"] = False
    folder = write_checkpoint(tmp_path / "deepspec", config, {**random_backbone(), **dspark_heads()})
    assert load_checkpoint(folder).config.sample_from_anchor is False
    assert load_checkpoint(folder, sample_from_anchor=True).config.sample_from_anchor is True
    zlab = write_checkpoint(tmp_path / "zlab", zlab_config(), random_backbone())
    assert load_checkpoint(zlab, sample_from_anchor=True).config.sample_from_anchor is True


def test_sharded_checkpoint_reads_like_a_single_file(tmp_path):
    sd = {**random_backbone(), **dspark_heads()}
    single = load_checkpoint(write_checkpoint(tmp_path / "single", deepspec_config(), sd))
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(deepspec_config()))
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({key: sd[key] for key in keys}, str(folder / shard))
    weight_map = {key: shard for shard, keys in shards.items() for key in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    sharded = load_checkpoint(folder)
    for name, tensor in single.state_dict().items():
        assert torch.equal(tensor, sharded.state_dict()[name]), name

    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard model-00002-of-00002\.safetensors listed in .*missing"):
        load_checkpoint(folder)


# ----------------------------------------------------------------------------------------------------------------
# Export and round trips
# ----------------------------------------------------------------------------------------------------------------


def randomized(draft):
    """Perturb every parameter (fresh drafts have unit norms and a zero Markov W2)."""
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for parameter in draft.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=gen) * 0.1)
    return draft


def config_semantics(config) -> dict:
    ignored = {"architectures", "auto_map", "transformers_version", "dtype", "torch_dtype", "_name_or_path"}
    return {key: value for key, value in config.to_dict().items() if key not in ignored}


def assert_same_draft(first, second, skip_prefixes=()):
    ours = {k: v for k, v in first.state_dict().items() if not k.startswith(skip_prefixes)}
    theirs = second.state_dict()
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


def test_round_trip_through_zlab_dflash(tmp_path):
    target = tiny_qwen3()
    draft = randomized(tiny_draft(target, num_hidden_layers=2, sample_from_anchor=False, target_layer_ids=LAYER_IDS))
    draft.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}
    notes = export_checkpoint(draft, tmp_path / "zlab", "zlab-dflash")
    assert any("auto_map" in note for note in notes)

    written = json.loads((tmp_path / "zlab" / "config.json").read_text())
    assert written["architectures"] == ["DFlashDraftModel"] and written["model_type"] == "qwen3"
    assert written["dflash_config"] == {"mask_token_id": draft.config.mask_token_id, "target_layer_ids": LAYER_IDS}
    assert written["block_size"] == 4 and written["num_target_layers"] == TARGET_DEPTH
    assert sorted(load_file(tmp_path / "zlab" / "model.safetensors")) == sorted(draft.state_dict())
    # A transformers Qwen3Config reads the same RoPE from the exported fields.
    assert Qwen3Config.from_dict(written).rope_parameters == draft.config.rope_parameters

    assert detect_format(tmp_path / "zlab") == "zlab-dflash"
    back = load_checkpoint(tmp_path / "zlab")
    assert_same_draft(draft, back)
    assert config_semantics(back.config) == config_semantics(draft.config)


@pytest.mark.parametrize("own_heads", [False, True], ids=["borrowed-embeddings", "own-embeddings"])
def test_round_trip_through_deepspec(tmp_path, own_heads):
    target = tiny_qwen3()
    extra = dict(confidence_threshold=0.3, confidence_stop="survival", sample_from_anchor=False) if own_heads else {}
    draft = tiny_draft(
        target,
        num_hidden_layers=2,
        target_layer_ids=LAYER_IDS,
        markov_rank=RANK,
        markov_head_type="gated",
        enable_confidence_head=True,
        has_embed_tokens=own_heads,
        has_lm_head=own_heads,
        **extra,
    )
    randomized(draft)
    notes = export_checkpoint(draft, tmp_path / "deepspec", "deepspec")
    assert any("not written" in note for note in notes) != own_heads  # says so when embed/lm_head are absent

    written = json.loads((tmp_path / "deepspec" / "config.json").read_text())
    assert written["architectures"] == ["Qwen3DSparkModel"] and "dflash_config" not in written
    assert written["markov_rank"] == RANK and written["markov_head_type"] == "gated"
    assert written["tie_word_embeddings"] is False and written["num_target_layers"] == TARGET_DEPTH
    keys = set(load_file(tmp_path / "deepspec" / "model.safetensors"))
    assert ("embed_tokens.weight" in keys, "lm_head.weight" in keys) == (own_heads, own_heads)

    assert detect_format(tmp_path / "deepspec") == "deepspec"
    back = load_checkpoint(tmp_path / "deepspec")
    assert_same_draft(draft, back)
    assert config_semantics(back.config) == config_semantics(draft.config)


def test_round_trip_through_native_format_and_automodel(tmp_path):
    zlab = write_checkpoint(tmp_path / "zlab", zlab_config(), random_backbone())
    result = convert(zlab, tmp_path / "native")
    assert (result.source_format, result.target_format) == ("zlab-dflash", "dspark")
    saved = json.loads((tmp_path / "native" / "config.json").read_text())
    assert saved["model_type"] == "dspark" and saved["sample_from_anchor"] is False
    assert (tmp_path / "native" / "modeling_dspark.py").is_file()

    reloaded = AutoModel.from_pretrained(tmp_path / "native", trust_remote_code=True)
    assert_same_draft(result.draft, reloaded)
    assert config_semantics(reloaded.config) == config_semantics(result.draft.config)
    assert detect_format(tmp_path / "native") == "dspark"
    assert_same_draft(result.draft, load_checkpoint(tmp_path / "native"))


def test_deepspec_to_native_keeps_the_dspark_convention(tmp_path):
    deepspec = write_checkpoint(tmp_path / "ds", deepspec_config(), {**random_backbone(), **dspark_heads()})
    result = convert(deepspec, tmp_path / "native")
    reloaded = AutoModel.from_pretrained(tmp_path / "native", trust_remote_code=True)
    assert reloaded.config.sample_from_anchor is True and reloaded.config.markov_rank == RANK
    assert_same_draft(result.draft, reloaded)
    summary = result.summary()
    assert "DeepSpec" in summary and "sample_from_anchor=True" in summary and "vanilla rank 8" in summary


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def zlab_folder(tmp_path):
    return write_checkpoint(tmp_path / "zlab", zlab_config(), random_backbone())


def test_unknown_format_lists_what_was_looked_for(tmp_path):
    folder = write_checkpoint(
        tmp_path / "llama", {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, random_backbone()
    )
    with pytest.raises(
        ValueError, match=r"unknown checkpoint format.*'llama'.*DFlashDraftModel.*Qwen3DSparkModel.*--from"
    ):
        load_checkpoint(folder)


def test_missing_folder_config_and_weights(tmp_path, zlab_folder):
    with pytest.raises(FileNotFoundError, match=r"no such directory"):
        load_checkpoint(tmp_path / "nowhere")
    (zlab_folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights found.*model\.safetensors.*index\.json"):
        load_checkpoint(zlab_folder)
    (zlab_folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_checkpoint(zlab_folder)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    sd = random_backbone()
    sd.pop("layers.1.self_attn.k_proj.weight")
    sd["mask_embedding"] = torch.zeros(HIDDEN)
    folder = write_checkpoint(tmp_path / "bad", zlab_config(), sd)
    with pytest.raises(
        ValueError, match=r"missing tensors: layers\.1\.self_attn\.k_proj\.weight.*unexpected tensors: mask_embedding"
    ):
        load_checkpoint(folder)


def test_markov_head_missing_from_weights_points_at_the_config(tmp_path):
    folder = write_checkpoint(tmp_path / "bad", deepspec_config(confidence=False), random_backbone())
    with pytest.raises(ValueError, match=r"missing tensors: markov_head\.markov_w1\.weight.*markov_rank=8"):
        load_checkpoint(folder)


def test_wrong_shape_names_key_expected_and_got(tmp_path):
    sd = random_backbone()
    sd["layers.0.self_attn.k_proj.weight"] = torch.zeros(HEADS * HEAD_DIM, HIDDEN)
    folder = write_checkpoint(tmp_path / "bad", zlab_config(), sd)
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.k_proj\.weight: expected \[32, 64\], got \[64, 64\]"):
        load_checkpoint(folder)


def test_truncated_safetensors_is_reported_as_corrupt(zlab_folder):
    weights = zlab_folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ValueError, match=r"model\.safetensors: the safetensors file is corrupt or truncated.*Re-download"
    ):
        load_checkpoint(zlab_folder)


def test_missing_required_config_fields_are_named(tmp_path):
    config = zlab_config()
    del config["dflash_config"], config["mask_token_id"]
    folder = write_checkpoint(tmp_path / "bad", config, random_backbone())
    with pytest.raises(ValueError, match=r"lacks \['mask_token_id'\] \(in dflash_config or top-level\)"):
        load_checkpoint(folder)


def test_unsupported_upstream_features_are_refused(tmp_path):
    rnn = deepspec_config(confidence=False)
    rnn["markov_head_type"] = "rnn"
    folder = write_checkpoint(tmp_path / "rnn", rnn, {**random_backbone(), **dspark_heads(confidence=False)})
    with pytest.raises(ValueError, match=r"markov_head_type='rnn' is not supported"):
        load_checkpoint(folder)

    pruned = {**random_backbone(), "d2t": torch.zeros(VOCAB, dtype=torch.long)}
    folder = write_checkpoint(tmp_path / "pruned", zlab_config(), pruned)
    with pytest.raises(ValueError, match=r"\['d2t'\].*pruned"):
        load_checkpoint(folder)

    yarn = zlab_config()
    yarn["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    folder = write_checkpoint(tmp_path / "yarn", yarn, random_backbone())
    with pytest.raises(ValueError, match=r"unsupported RoPE settings.*yarn"):
        load_checkpoint(folder)


def test_invalid_config_values_are_explained(tmp_path):
    config = zlab_config()
    config["dflash_config"]["target_layer_ids"] = [1, 7]
    folder = write_checkpoint(tmp_path / "bad", config, random_backbone())
    with pytest.raises(
        ValueError, match=r"invalid draft: DSparkConfig: target_layer_ids contains 7 but the target has 5"
    ):
        load_checkpoint(folder)


def test_zlab_export_refuses_what_zlab_cannot_express(tmp_path):
    target = tiny_qwen3()
    with pytest.raises(ValueError, match=r"cannot export to zlab-dflash: it has a Markov head.*--to deepspec"):
        export_checkpoint(tiny_draft(target, markov_rank=4, sample_from_anchor=False), tmp_path / "a", "zlab-dflash")
    with pytest.raises(ValueError, match=r"cannot export to zlab-dflash: .*sample_from_anchor=True"):
        export_checkpoint(tiny_draft(target), tmp_path / "b", "zlab-dflash")
    deepspec = write_checkpoint(tmp_path / "ds", deepspec_config(), {**random_backbone(), **dspark_heads()})
    with pytest.raises(ValueError, match=r"Markov head.*anchor-first"):
        convert(deepspec, tmp_path / "out", to_fmt="zlab-dflash")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_destination_must_be_new_or_forced(tmp_path, zlab_folder):
    with pytest.raises(ValueError, match=r"is the source folder"):
        convert(zlab_folder, zlab_folder, overwrite=True)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"not empty.*--force"):
        convert(zlab_folder, tmp_path / "busy")
    convert(zlab_folder, tmp_path / "busy", overwrite=True)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def subcommand_parser():
    parser = argparse.ArgumentParser(prog="dspark convert")
    convert_module.add_arguments(parser)
    return parser


def test_subcommand_converts_and_prints_a_summary(tmp_path, zlab_folder, capsys):
    assert convert_module.COMMAND == "convert" and convert_module.HELP
    args = subcommand_parser().parse_args([str(zlab_folder), str(tmp_path / "out"), "--to", "deepspec"])
    assert convert_module.run(args) == 0
    printed = capsys.readouterr().out
    assert "z-lab DFlash -> DeepSeek DeepSpec DSpark" in printed
    assert "2 draft layers" in printed and "block_size 4" in printed and "sample_from_anchor=False" in printed
    assert "Markov none" in printed and "embed_tokens from the target" in printed
    assert detect_format(tmp_path / "out") == "deepspec"
    assert load_checkpoint(tmp_path / "out").config.sample_from_anchor is False

    args = subcommand_parser().parse_args([str(tmp_path / "nowhere"), str(tmp_path / "out2")])
    with pytest.raises(FileNotFoundError, match=r"no such directory"):
        convert_module.run(args)


def test_subcommand_options_reach_the_converter(tmp_path, capsys):
    sd = torchspec_names({**random_backbone(), **dspark_heads()})
    sd.pop("lm_head.weight")
    folder = write_checkpoint(tmp_path / "ts", torchspec_config(), sd)
    argv = [
        str(folder),
        str(tmp_path / "out"),
        "--from",
        "torchspec",
        "--block-size",
        "6",
        "--slot-convention",
        "dflash",
    ]
    assert convert_module.run(subcommand_parser().parse_args(argv)) == 0
    config = load_checkpoint(tmp_path / "out").config
    assert (config.block_size, config.sample_from_anchor) == (6, False)
    assert "TorchSpec" in capsys.readouterr().out


def test_dspark_cli_main(tmp_path, zlab_folder, capsys):
    pytest.importorskip("dspark.selfcheck")
    from dspark.cli import main

    assert main(["convert", str(zlab_folder), str(tmp_path / "out")]) == 0
    assert "z-lab DFlash -> dspark" in capsys.readouterr().out
    assert AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True).config.block_size == 4

    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "out2")]) == 2
    error = capsys.readouterr().err
    assert "error: dspark convert:" in error and "no such directory" in error and "Traceback" not in error
