"""The verify block's attention as one Triton kernel (part of `skinny_kernels=True`).

On a CPU the kernel runs under Triton's interpreter (conftest sets TRITON_INTERPRET) in float32 and float16 (the
interpreter's bf16 product is broken); benchmarks/verify_attention.py checks bf16 against SDPA on a GPU.
"""

import os

import pytest
import torch
from tiny_models import tiny_qwen3
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import dspark.verify_attention as verify_attention

if os.environ.get("CI"):
    import triton  # noqa: F401  (CI installs it)
pytest.importorskip("triton")


def random_inputs(batch, heads, kv_heads, queries, keys, head_dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, queries, head_dim, generator=generator).to(dtype)
    key = torch.randn(batch, kv_heads, keys, head_dim, generator=generator).to(dtype)
    value = torch.randn(batch, kv_heads, keys, head_dim, generator=generator).to(dtype)
    return query, key, value


def causal_block_mask(batch, queries, keys, seed=0):
    """[B, 1, Q, L] bool: row b sees its first `length_b` entries and its block causally (as the static loop's
    mask), different lengths per row; entries past the block are empty cache slots."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, keys - queries + 1, (batch,), generator=generator)
    positions = torch.arange(keys)
    query_at = lengths[:, None] + torch.arange(queries)[None]  # [B, Q]
    return (positions[None, None, :] <= query_at[:, :, None])[:, None]


def sdpa_reference(query, key, value, mask, scaling):
    group = query.shape[1] // key.shape[1]
    key, value = (t.double().repeat_interleave(group, dim=1) for t in (key, value))
    out = torch.nn.functional.scaled_dot_product_attention(
        query.double(), key, value, attn_mask=mask if mask.dtype == torch.bool else mask.double(), scale=scaling
    )
    return out.transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "batch, heads, kv_heads, queries, keys, head_dim",
    [
        (1, 8, 2, 9, 96, 32),  # a verify block, grouped queries (4 heads per key/value head)
        (2, 4, 4, 3, 130, 16),  # no grouping, keys not a multiple of the key block
        (1, 8, 1, 9, 64, 24),  # 72 packed rows: two row blocks; a head size that is not a power of two
        (3, 2, 1, 1, 40, 16),  # plain decoding (one query)
    ],
)
def test_kernel_equals_sdpa_with_the_loops_mask(batch, heads, kv_heads, queries, keys, head_dim, dtype):
    query, key, value = random_inputs(batch, heads, kv_heads, queries, keys, head_dim, dtype)
    mask = causal_block_mask(batch, queries, keys)
    scaling = head_dim**-0.5
    out = verify_attention.attention(query, key, value, mask, scaling)
    expected = sdpa_reference(query, key, value, mask, scaling)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    assert out.shape == (batch, queries, heads, head_dim)
    torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=tolerance)


def test_additive_and_per_head_masks_are_applied_as_sdpa_applies_them():
    query, key, value = random_inputs(2, 4, 2, 5, 70, 16, torch.float32)
    visible = causal_block_mask(2, 5, 70)
    additive = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    additive = additive + torch.randn(visible.shape) * visible  # a bias on the visible entries too
    per_head = visible.expand(2, 4, 5, 70).clone()
    per_head[:, 1, :, :3] = False  # one head sees less
    for mask in (additive, per_head):
        out = verify_attention.attention(query, key, value, mask, 0.3)
        torch.testing.assert_close(out.double(), sdpa_reference(query, key, value, mask, 0.3), atol=1e-5, rtol=1e-5)


def test_long_caches_split_the_keys_and_combine_the_parts(monkeypatch):
    """Keys over parts of programs (a long cache on few programs): partial results merged by the combine kernel."""
    query, key, value = random_inputs(1, 4, 2, 9, 700, 16, torch.float32)
    mask = causal_block_mask(1, 9, 700, seed=3)
    assert verify_attention.plan_attention(1, 4, 2, 9, 700, 16, 8).splits > 1  # the interpreter's 8 "SMs"
    calls = []
    original = verify_attention.combine_splits_kernel
    monkeypatch.setattr(verify_attention, "combine_splits_kernel", CountingKernel(original, calls))
    out = verify_attention.attention(query, key, value, mask, 0.25)
    assert calls, "the combine kernel did not run"
    torch.testing.assert_close(out.double(), sdpa_reference(query, key, value, mask, 0.25), atol=1e-5, rtol=1e-5)


class CountingKernel:
    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        self.calls.append(grid)
        return self.kernel[grid]


def test_calls_the_kernel_cannot_serve_go_to_transformers_sdpa():
    query, key, value = random_inputs(1, 4, 2, 3, 20, 16, torch.float32)
    mask = causal_block_mask(1, 3, 20)
    assert verify_attention.unserved(query, key, value, mask, 0.0, {}) is None
    assert "mask" in verify_attention.unserved(query, key, value, None, 0.0, {})
    assert "sliding" in verify_attention.unserved(query, key, value, mask, 0.0, {"sliding_window": 8})
    assert "dropout" in verify_attention.unserved(query, key, value, mask, 0.1, {})
    assert "sinks" in verify_attention.unserved(query, key, value, mask, 0.0, {"s_aux": torch.zeros(4)})
    long_query = torch.randn(1, 4, verify_attention.MAX_QUERIES + 1, 16)
    long_mask = torch.ones(1, 1, verify_attention.MAX_QUERIES + 1, 20, dtype=torch.bool)
    assert "verify block" in verify_attention.unserved(long_query, key, value, long_mask, 0.0, {})


def test_routing_swaps_transformers_sdpa_function_for_the_duration_only():
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    with verify_attention.routed_sdpa():
        routed = ALL_ATTENTION_FUNCTIONS["sdpa"]
        assert routed is not original
        with verify_attention.routed_sdpa():  # re-entrant
            assert ALL_ATTENTION_FUNCTIONS["sdpa"] is routed
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is routed
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is original
    with verify_attention.routed_sdpa():
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is routed  # one routed function per original (dynamo's cache)


def test_a_target_forward_through_the_routed_function_equals_its_sdpa_forward(monkeypatch):
    """A whole tiny Qwen3 forward over a cache prefix and a block, the routed kernel against transformers' SDPA;
    the kernel ran once per layer."""
    target = tiny_qwen3().float().eval()
    layers = target.config.num_hidden_layers
    ids = torch.randint(0, target.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    visible = torch.tril(torch.ones(12, 12, dtype=torch.bool))[None, None].expand(2, 1, 12, 12).clone()
    visible[1, :, :, :2] = False  # row 1 is left-padded by two
    visible[1, :, :2, :2] = torch.eye(2, dtype=torch.bool)  # (its padding sees itself, as transformers' masks do)
    with torch.no_grad():
        expected = target(ids, attention_mask=visible).logits
        calls = []
        original = verify_attention.attention
        monkeypatch.setattr(verify_attention, "attention", lambda *a: calls.append(1) or original(*a))
        with verify_attention.routed_sdpa():
            out = target(ids, attention_mask=visible).logits
    assert len(calls) == layers
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_plans_split_the_keys_only_where_the_programs_leave_most_sms_idle():
    h200 = 132
    single = verify_attention.plan_attention(1, 32, 8, 9, 256, 128, h200)  # Qwen3-8B heads, batch 1: 8 programs
    assert (single.splits, single.block_n, single.keys_per_split) == (8, 32, 32)
    batched = verify_attention.plan_attention(16, 32, 8, 9, 256, 128, h200)  # 128 programs: no parts
    assert batched.splits == 1 and batched.keys_per_split >= 256
    long = verify_attention.plan_attention(1, 32, 8, 9, 4096, 128, h200)
    assert long.keys_per_split >= 256 and long.splits * long.keys_per_split >= 4096
    wide = verify_attention.plan_attention(1, 16, 4, 9, 256, 256, h200)  # Qwen3.5-9B's 256-wide heads
    assert wide.block_dim == 256 and wide.warps == 8


def test_the_routed_function_hands_calls_it_cannot_serve_to_the_original(monkeypatch):
    query, key, value = random_inputs(1, 4, 2, 3, 20, 16, torch.float32)
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    calls = []
    monkeypatch.setattr(verify_attention, "attention", lambda *a: calls.append(1))
    with verify_attention.routed_sdpa():
        routed = ALL_ATTENTION_FUNCTIONS["sdpa"]
        out, _ = routed(module, query, key, value, None, scaling=0.25)  # no mask: SDPA's causal default
    expected, _ = original(module, query, key, value, None, scaling=0.25)
    assert not calls
    torch.testing.assert_close(out, expected)
