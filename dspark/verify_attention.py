"""Attention of a verify block (a few queries per sequence) over the static cache, as one Triton kernel.

The verify step's queries, Q = N + 1 per sequence (9 at block 8), attend to the whole static cache under the mask
the loop builds. torch's SDPA serves that with kernels made for long query blocks: on an H200 (Qwen3-8B shape, 256
cache entries) cuDNN's took 9.4 us per layer plus ~6 us of memset and idle GPU before it, the memory-efficient one
12.3 us, for ~0.3 MB of keys and values per layer (benchmarks/verify_profile.py).

`verify_attention_kernel` runs one program per (sequence, key/value head), or per part of its keys on long caches:
the Q queries of all G query heads sharing that key/value head form one block of G x Q rows (grouped-query attention
packed: each key and value is read once for all of them), with an online softmax over blocks of keys. Parts of the
keys write float32 partial results that `combine_splits_kernel` merges.

`routed_sdpa()` puts it in place of transformers' "sdpa" attention function for the duration (the static loop's
verify step with `skinny_kernels=True`); calls it cannot serve exactly (sliding windows, soft-capping, sinks, dropout,
no mask, more queries than a verify block) go to transformers' own function.

Shapes: query [B, H, Q, D], key and value [B, Hkv, L, D] (L: the cache length), mask [B or 1, 1 or H, Q, L] (bool:
True attends; float: added to the scores); the output [B, Q, H, D] as transformers' attention functions return it.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, replace

import torch

from .skinny_linear import KERNEL_DTYPES, device_limits, interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # optional, as for dspark.skinny_linear
    triton = None

MAX_QUERIES = 64  # queries per sequence served (a verify block); more go to SDPA
BLOCK_KEYS = 64
SHORT_CACHE = 512  # keys
MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2

if triton is not None:

    @triton.jit
    def verify_attention_kernel(
        q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, partial_ptr, stats_ptr,
        queries, keys, group, kv_heads, scaling, keys_per_split,
        sqb, sqh, sqq, skb, skh, skl, svb, svh, svl, smb, smh, smq, sml, sob, soq, soh,
        HEAD_DIM: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        MASK_KIND: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """Rows (query head g of the group, query i) = (r // Q, r % Q) of one key/value head, over keys
        [split * keys_per_split, ...). Not SPLIT: the normalised output. SPLIT: the unnormalised float32 sum, the row
        maximum and the row's sum of exponentials into partial [B, H, Q, splits, D] and stats [B, H, Q, splits, 2]."""
        sequence = tl.program_id(0) // kv_heads
        kv_head = tl.program_id(0) % kv_heads
        split = tl.program_id(1)
        splits = tl.num_programs(1)
        rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_valid = rows < group * queries
        head = kv_head * group + rows // queries
        query = rows % queries
        dims = tl.arange(0, BLOCK_DIM)
        dim_valid = dims < HEAD_DIM
        precision: tl.constexpr = "ieee" if IEEE else "tf32"
        q = tl.load(
            q_ptr + sequence * sqb + head[:, None] * sqh + query[:, None] * sqq + dims[None, :],
            mask=row_valid[:, None] & dim_valid[None, :],
            other=0.0,
        )
        best = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        total = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_DIM), dtype=tl.float32)
        start = split * keys_per_split
        stop = tl.minimum(start + keys_per_split, keys)
        for first in range(start, stop, BLOCK_N):
            cols = first + tl.arange(0, BLOCK_N)
            col_valid = cols < stop
            kv_mask = col_valid[:, None] & dim_valid[None, :]
            k_at = k_ptr + sequence * skb + kv_head * skh + cols[:, None] * skl + dims[None, :]
            k = tl.load(k_at, mask=kv_mask, other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=precision) * scaling
            visible = row_valid[:, None] & col_valid[None, :]
            if MASK_KIND != 0:
                at = mask_ptr + sequence * smb + head[:, None] * smh + query[:, None] * smq + cols[None, :] * sml
                if MASK_KIND == 1:
                    visible = visible & (tl.load(at, mask=visible, other=0) != 0)
                else:
                    scores += tl.load(at, mask=visible, other=0.0).to(tl.float32)
            scores = tl.where(visible, scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, axis=1))
            shift = tl.where(new_best == float("-inf"), 0.0, new_best)  # a row with nothing visible yet stays 0
            weights = tl.exp(scores - shift[:, None])
            rescale = tl.exp(best - shift)
            total = total * rescale + tl.sum(weights, axis=1)
            v_at = v_ptr + sequence * svb + kv_head * svh + cols[:, None] * svl + dims[None, :]
            v = tl.load(v_at, mask=kv_mask, other=0.0)
            acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=precision)
            best = new_best
        out_mask = row_valid[:, None] & dim_valid[None, :]
        if SPLIT:
            slot = ((sequence * kv_heads * group + head) * queries + query) * splits + split  # [B, H, Q, splits]
            tl.store(partial_ptr + slot[:, None] * BLOCK_DIM + dims[None, :], acc, mask=out_mask)
            tl.store(stats_ptr + slot * 2, best, mask=row_valid)
            tl.store(stats_ptr + slot * 2 + 1, total, mask=row_valid)
        else:
            out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
            at = out_ptr + sequence * sob + query[:, None] * soq + head[:, None] * soh + dims[None, :]
            tl.store(at, out.to(out_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def combine_splits_kernel(
        partial_ptr, stats_ptr, out_ptr, heads, queries, splits, sob, soq, soh,
        HEAD_DIM: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
    ):  # fmt: skip
        """One output row (sequence, head, query) from its splits' partial results."""
        row = tl.program_id(0)  # (sequence * heads + head) * queries + query
        sequence, head, query = row // (heads * queries), (row // queries) % heads, row % queries
        parts = tl.arange(0, BLOCK_SPLITS)
        part_valid = parts < splits
        dims = tl.arange(0, BLOCK_DIM)
        dim_valid = dims < HEAD_DIM  # the partial sums' padding columns were never written
        best = tl.load(stats_ptr + (row * splits + parts) * 2, mask=part_valid, other=float("-inf"))
        total = tl.load(stats_ptr + (row * splits + parts) * 2 + 1, mask=part_valid, other=0.0)
        top = tl.max(best, axis=0)
        top = tl.where(top == float("-inf"), 0.0, top)
        scale = tl.where(part_valid, tl.exp(best - top), 0.0)
        acc = tl.load(
            partial_ptr + (row * splits + parts)[:, None] * BLOCK_DIM + dims[None, :],
            mask=part_valid[:, None] & dim_valid[None, :],
            other=0.0,
        )
        out = tl.sum(acc * scale[:, None], axis=0)
        norm = tl.sum(total * scale, axis=0)
        out = out / tl.where(norm == 0.0, 1.0, norm)
        at = out_ptr + sequence * sob + query * soq + head * soh + dims
        tl.store(at, out.to(out_ptr.dtype.element_ty), mask=dim_valid)


@dataclass(frozen=True)
class AttentionPlan:
    block_m: int  # packed rows (query heads of a group x queries) per program
    block_dim: int  # the head size padded to a power of two
    row_blocks: int  # programs per (sequence, key/value head) for the packed rows
    keys_per_split: int  # keys per program
    splits: int  # programs per (sequence, key/value head, row block) over the keys
    warps: int
    block_n: int = BLOCK_KEYS  # keys per step of a program
    stages: int = 2


def split_keys(plan: AttentionPlan, keys: int, splits: int, block_n: int | None = None) -> AttentionPlan:
    """`plan` with its keys over `splits` parts (whole key blocks each: the count may come out lower)."""
    block_n = block_n or plan.block_n
    keys_per_split = triton.cdiv(triton.cdiv(keys, splits), block_n) * block_n
    return replace(plan, keys_per_split=keys_per_split, splits=triton.cdiv(keys, keys_per_split), block_n=block_n)


@functools.cache
def plan_attention(
    batch: int, heads: int, kv_heads: int, queries: int, keys: int, head_dim: int, processors: int
) -> AttentionPlan:
    """Where the programs of (sequence, key/value head, row block) alone cover half the SMs, one part of the keys
    each; else short caches (<= 512 keys) in up to 8 parts of 32-key blocks, and long ones in parts of at least 256
    keys that cover the SMs. Measured on an H200 (benchmarks/verify_attention.py --sweep, 9 queries, 256 keys, batch
    1): 8 parts of 32-key blocks took 6.5 us on the Qwen3-8B heads and 8.0 on Qwen3.5-9B's, one part 10.8 and 16.6."""
    packed = heads // kv_heads * queries
    block_m = max(16, min(64, triton.next_power_of_2(packed)))
    block_dim = max(16, triton.next_power_of_2(head_dim))
    row_blocks = triton.cdiv(packed, block_m)
    programs = batch * kv_heads * row_blocks
    plan = AttentionPlan(block_m, block_dim, row_blocks, keys, 1, 8 if block_dim >= 256 else 4)
    if 2 * programs >= processors:
        return split_keys(plan, keys, 1)
    if keys <= SHORT_CACHE:
        return split_keys(plan, keys, min(8, triton.cdiv(keys, 32), max(1, processors // programs)), block_n=32)
    return split_keys(plan, keys, min(triton.cdiv(keys, 256), triton.cdiv(processors, programs)))


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    plan: AttentionPlan | None = None,
) -> torch.Tensor:
    """softmax(query key^T * scaling + mask) value for query [B, H, Q, D], key/value [B, Hkv, L, D] (last dimension
    contiguous), mask [B or 1, 1 or H, Q, L] or None; returns [B, Q, H, D]. `plan` overrides `plan_attention` (the
    tuning benchmark)."""
    batch, heads, queries, head_dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    if plan is None:
        plan = plan_attention(batch, heads, kv_heads, queries, keys, head_dim, device_limits(query.device)[0])
    out = query.new_empty(batch, queries, heads, head_dim)
    if mask is None:
        kind, mask_strides, mask = MASK_NONE, (0, 0, 0, 0), query
    else:
        kind = MASK_BOOL if mask.dtype == torch.bool else MASK_ADD
        mask_strides = tuple(0 if size == 1 else stride for size, stride in zip(mask.shape, mask.stride()))
    partial = stats = out
    if plan.splits > 1:
        parts = (batch, heads, queries, plan.splits)
        partial = torch.empty(*parts, plan.block_dim, device=query.device, dtype=torch.float32)
        stats = torch.empty(*parts, 2, device=query.device, dtype=torch.float32)
    verify_attention_kernel[(batch * kv_heads, plan.splits, plan.row_blocks)](
        query, key, value, mask, out, partial, stats,
        queries, keys, heads // kv_heads, kv_heads, scaling, plan.keys_per_split,
        *query.stride()[:3], *key.stride()[:3], *value.stride()[:3], *mask_strides, *out.stride()[:3],
        HEAD_DIM=head_dim, BLOCK_DIM=plan.block_dim, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, MASK_KIND=kind,
        SPLIT=plan.splits > 1, IEEE=query.dtype == torch.float32, num_warps=plan.warps, num_stages=plan.stages,
    )  # fmt: skip
    if plan.splits > 1:
        combine_splits_kernel[(batch * heads * queries,)](
            partial, stats, out, heads, queries, plan.splits, *out.stride()[:3],
            HEAD_DIM=head_dim, BLOCK_DIM=plan.block_dim, BLOCK_SPLITS=max(2, triton.next_power_of_2(plan.splits)),
        )  # fmt: skip
    return out


# One opaque op for torch.compile (as dspark::skinny_linear).
@torch.library.custom_op("dspark::verify_attention", mutates_args=())
def verify_attention_op(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    return attention(query, key, value, mask, scaling)


@verify_attention_op.register_fake
def _(query, key, value, mask, scaling):
    batch, heads, queries, head_dim = query.shape
    return query.new_empty(batch, queries, heads, head_dim)


def unserved(query, key, value, mask, dropout: float, kwargs: dict) -> str | None:
    """Why the kernel cannot compute this call exactly as SDPA would (None: it can)."""
    if query.device.type != "cuda" and not interpreting():
        return "not on a CUDA GPU"
    if query.dtype not in KERNEL_DTYPES and not interpreting():
        return f"dtype {query.dtype}"
    if mask is None:
        return "no mask (SDPA's causal default)"
    if dropout or kwargs.get("sliding_window") or kwargs.get("softcap"):
        return "dropout, a sliding window or soft-capping"
    if kwargs.get("s_aux") is not None or kwargs.get("position_bias") is not None:
        return "attention sinks or a position bias"
    if query.shape[2] > MAX_QUERIES or query.shape[1] % key.shape[1] or key.shape[-1] != value.shape[-1]:
        return "not a verify block of grouped-query attention"
    if mask.dim() != 4 or mask.shape[1] not in (1, query.shape[1]) or mask.shape[-1] != key.shape[2]:
        return f"mask of shape {tuple(mask.shape)}"
    if any(t.stride(-1) != 1 for t in (query, key, value, mask)):
        return "a tensor with a strided last dimension"
    return None


def _make_routed_sdpa(original):
    def routed_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        if unserved(query, key, value, attention_mask, dropout, kwargs) is not None:
            return original(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
                **kwargs,
            )  # fmt: skip
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return verify_attention_op(query, key, value, attention_mask, scale), None

    return routed_sdpa


_ROUTED: dict = {}


@contextlib.contextmanager
def routed_sdpa():
    """transformers' "sdpa" attention function replaced by the kernel (where it can serve the call) for the
    duration; re-entrant."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    current = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if current in _ROUTED.values():  # already routed (a nested call)
        yield
        return
    routed = _ROUTED.setdefault(current, _make_routed_sdpa(current))  # one function per original: dynamo's cache
    local = ALL_ATTENTION_FUNCTIONS._local_mapping
    had, previous = "sdpa" in local, local.get("sdpa")
    ALL_ATTENTION_FUNCTIONS["sdpa"] = routed
    try:
        yield
    finally:
        if had:
            local["sdpa"] = previous
        else:
            del local["sdpa"]
