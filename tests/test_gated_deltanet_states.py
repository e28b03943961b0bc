"""Hybrid targets' linear-attention state in fixed shapes (dspark.gated_deltanet_states): our verify forward of a
Gated DeltaNet layer against transformers' own, the per-row commit, and the forwards' installation."""

import inspect

import pytest
import torch
from tiny_models import tiny_draft, tiny_qwen3_next, tiny_qwen35
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
    keyword = "cache" if "cache" in inspect.signature(module.forward).parameters else "cache_params"  # 5.2x / 5.17
    outputs, recurrent, conv = [], [], []
    for position in range(hidden.shape[1]):
        outputs.append(module(hidden[:, position : position + 1], **{keyword: cache}))
        layer = cache.layers[module.layer_idx]
        recurrent.append(layer.recurrent_states[0].clone())
        conv.append(layer.conv_states[0].clone())
    return torch.cat(outputs, dim=1), recurrent, conv


@pytest.mark.parametrize("value_heads", [2, 4], ids=["heads-equal", "value-heads-repeat-key-heads"])
@torch.no_grad()
def test_block_forward_equals_the_layers_own_decode_and_commits_the_state_after_any_kept_count(value_heads):
    target = tiny_qwen35(seed=3, linear_num_value_heads=value_heads)
    rows = QUERIES + 1  # row r keeps r tokens of the block: none .. all of them
    ours, theirs = prefilled(target, rows=rows), prefilled(target, rows=rows)
    states = GatedDeltaNetStates(target, batch=rows, queries=QUERIES)
    states.load_prefill(ours)
    hidden = torch.randn(rows, QUERIES, target.config.hidden_size, generator=torch.Generator().manual_seed(1))
    for index, module in states.modules.items():
        layer = states.layers[index]
        before = (layer.recurrent.clone(), layer.conv.clone())
        expected, recurrent, conv = transformers_token_by_token(module, theirs, hidden)
        states.kept.zero_()  # nothing to commit before this block (the runner zeroes it after each verify)
        output = block_forward(module, layer, hidden)
        torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
        states.kept.copy_(torch.arange(rows))
        layer.commit()
        torch.testing.assert_close(layer.recurrent[0], before[0][0], rtol=0, atol=0)  # kept none: unchanged
        torch.testing.assert_close(layer.conv[0], before[1][0], rtol=0, atol=0)
        for row in range(1, rows):
            torch.testing.assert_close(layer.recurrent[row], recurrent[row - 1][row], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(layer.conv[row], conv[row - 1][row, :, -layer.conv.shape[2] :])


@torch.no_grad()
def test_the_next_block_continues_from_each_rows_committed_state():
    """Two verify blocks in a row (the second commits the first): the second's outputs equal the layer's own decode
    over only the kept tokens of the first, then the second."""
    target = tiny_qwen35(seed=4)
    kept = [2, 0, QUERIES]  # part of the block, none (a finished row), all of it
    rows = len(kept)
    states = GatedDeltaNetStates(target, batch=rows, queries=QUERIES)
    states.load_prefill(prefilled(target, rows=rows))
    index, module = next(iter(states.modules.items()))
    generator = torch.Generator().manual_seed(2)
    first, second = (torch.randn(rows, QUERIES, target.config.hidden_size, generator=generator) for _ in range(2))
    block_forward(module, states.layers[index], first)
    states.kept.copy_(torch.tensor(kept))
    output = block_forward(module, states.layers[index], second)  # commits the first block, then runs the second
    for row, count in enumerate(kept):
        theirs = prefilled(target, rows=rows)
        hidden = torch.cat([first[:, :count], second], dim=1)
        expected, _, _ = transformers_token_by_token(module, theirs, hidden)
        torch.testing.assert_close(output[row], expected[row, count:], rtol=1e-5, atol=1e-6)


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


def test_linear_attention_of_another_kind_is_refused_with_the_way_out():
    target = tiny_qwen3_next()  # its Gated DeltaNet fuses the projections ours reads one by one
    with pytest.raises(ValueError, match=r"Gated DeltaNet.*Qwen3NextGatedDeltaNet.*in_proj_qkv.*static_cache=False"):
        check_static_support(target)
    with pytest.raises(ValueError, match="static_cache=False"):
        speculative_generate(target, tiny_draft(target), torch.ones(1, 4, dtype=torch.long), static_cache=True)
    assert gated_deltanet_modules(tiny_qwen35()).keys() == {0, 1, 2}
