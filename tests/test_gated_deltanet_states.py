"""Hybrid targets' linear-attention state in fixed shapes (dspark.gated_deltanet_states): our verify forward of a
Gated DeltaNet layer against transformers' own, the per-row commit, and the forwards' installation."""

import pytest
import torch
from tiny_models import tiny_draft, tiny_qwen35
from transformers import DynamicCache

from dspark.gated_deltanet_states import GatedDeltaNetStates, block_forward, gated_deltanet_modules
from dspark.modeling_dspark import cache_keyword
from dspark.speculative import speculative_generate
from dspark.static_loop import check_static_support

QUERIES = 5


def prefilled(target, rows: int = 2, length: int = 7, seed: int = 0) -> DynamicCache:
    """transformers' cache after a prefill of random prompts [rows, length]."""
    ids = torch.randint(0, target.config.vocab_size, (rows, length), generator=torch.Generator().manual_seed(seed))
    cache = DynamicCache(config=target.config)
    target(input_ids=ids, **{cache_keyword(target): cache}, use_cache=True)
    return cache


def transformers_token_by_token(module, cache: DynamicCache, hidden: torch.Tensor):
    """The layer's own forward one token at a time (its decode path) from `cache`: outputs [B, Q, H], and the
    recurrent and conv states after each token."""
    keyword = "cache" if "cache" in type(module).forward.__code__.co_varnames else "cache_params"
    outputs, recurrent, conv = [], [], []
    for position in range(hidden.shape[1]):
        outputs.append(module(hidden[:, position : position + 1], **{keyword: cache}))
        layer = cache.layers[module.layer_idx]
        recurrent.append(layer.recurrent_states[0].clone())
        conv.append(layer.conv_states[0].clone())
    return torch.cat(outputs, dim=1), recurrent, conv


@pytest.mark.parametrize("value_heads", [2, 4], ids=["heads-equal", "value-heads-repeat-key-heads"])
@torch.no_grad()
def test_block_forward_equals_the_layers_own_decode_and_records_every_positions_state(value_heads):
    target = tiny_qwen35(seed=3, linear_num_value_heads=value_heads)
    ours, theirs = prefilled(target), prefilled(target)
    states = GatedDeltaNetStates(target, batch=2, queries=QUERIES)
    states.load_prefill(ours)
    hidden = torch.randn(2, QUERIES, target.config.hidden_size, generator=torch.Generator().manual_seed(1))
    for index, module in states.modules.items():
        expected, recurrent, _ = transformers_token_by_token(module, theirs, hidden)
        output = block_forward(module, states.layers[index], hidden)
        torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
        for position in range(QUERIES):
            torch.testing.assert_close(states.layers[index].block_states[:, position], recurrent[position])


@torch.no_grad()
def test_commit_moves_each_row_to_its_state_after_its_kept_tokens():
    target = tiny_qwen35(seed=4)
    rows = 3
    ours, theirs = prefilled(target, rows=rows), prefilled(target, rows=rows)
    states = GatedDeltaNetStates(target, batch=rows, queries=QUERIES)
    states.load_prefill(ours)
    index, module = next(iter(states.modules.items()))
    layer = states.layers[index]
    before = (layer.recurrent.clone(), layer.conv.clone())
    hidden = torch.randn(rows, QUERIES, target.config.hidden_size, generator=torch.Generator().manual_seed(2))
    _, recurrent, conv = transformers_token_by_token(module, theirs, hidden)
    block_forward(module, layer, hidden)
    kept = [2, 0, QUERIES]  # part of the block, none (a finished row), all of it
    states.kept.copy_(torch.tensor(kept))
    layer.commit()
    width = layer.conv.shape[2]
    for row, count in enumerate(kept):
        if count == 0:
            torch.testing.assert_close(layer.recurrent[row], before[0][row], rtol=0, atol=0)
            torch.testing.assert_close(layer.conv[row], before[1][row], rtol=0, atol=0)
        else:
            torch.testing.assert_close(layer.recurrent[row], recurrent[count - 1][row])
            torch.testing.assert_close(layer.conv[row], conv[count - 1][row, :, -width:])


@torch.no_grad()
def test_installed_forwards_leave_other_uses_of_the_target_alone_and_are_removed_afterwards():
    target = tiny_qwen35(seed=5)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    expected = target.generate(ids, max_new_tokens=8, do_sample=False)
    states = GatedDeltaNetStates(target, batch=1, queries=QUERIES)
    with states.installed():
        assert all("forward" in module.__dict__ for module in states.modules.values())
        assert torch.equal(target.generate(ids, max_new_tokens=8, do_sample=False), expected)
    assert not any("forward" in module.__dict__ for module in states.modules.values())


def tiny_qwen3_next():
    """A hybrid target whose Gated DeltaNet fuses its projections (in_proj_qkvz, in_proj_ba): not ours to run."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    torch.manual_seed(0)
    config = Qwen3NextConfig(
        vocab_size=128,
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
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return Qwen3NextForCausalLM(config).eval()


def test_linear_attention_of_another_kind_is_refused_with_the_way_out():
    target = tiny_qwen3_next()
    with pytest.raises(ValueError, match=r"Gated DeltaNet.*Qwen3NextGatedDeltaNet.*in_proj_qkv.*static_cache=False"):
        check_static_support(target)
    with pytest.raises(ValueError, match="static_cache=False"):
        speculative_generate(target, tiny_draft(target), torch.ones(1, 4, dtype=torch.long), static_cache=True)
    assert gated_deltanet_modules(tiny_qwen35()).keys() == {0, 1, 2}
