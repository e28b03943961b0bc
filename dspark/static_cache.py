"""Fixed-address caches and masks: what a forward needs so that every round has the same shapes and buffers.

CUDA graphs replay kernels on the memory addresses they were recorded with, so nothing a captured step reads or
writes may be reallocated between rounds: KV caches are preallocated to a maximum length, the write position lives in
a device tensor, and the part of the buffer a query may see is chosen by a mask rather than by slicing.

Shapes: B rows, L cache length, Q query positions, D head dim.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import StaticCache, StaticLayer


def bucket_length(length: int, multiple: int = 128) -> int:
    """Cache lengths rounded up to a multiple: calls with slightly different prompts then share one captured graph,
    and memory-efficient SDPA wants mask rows aligned (else it pads a copy of the mask every call)."""
    return -(-length // multiple) * multiple


def write_rows(buffer: torch.Tensor, start: torch.Tensor, entries: torch.Tensor) -> None:
    """buffer [B, H, L, D] <- entries [B, H, n, D] at indices start[b] .. start[b] + n - 1 of each row b (in place).

    Rows accept different numbers of tokens, so each row of a batch writes at its own cache index.
    """
    index = start[:, None] + torch.arange(entries.shape[2], device=entries.device)
    buffer.scatter_(2, index[:, None, :, None].expand_as(entries), entries)


class StaticDraftCache:
    """Draft KV buffers at fixed addresses, used in place of a DynamicCache by `DSparkAttention`.

    `update` writes each row's new context + block entries at `position[b]`, `position[b] + 1`, ... and returns the
    whole buffers; a 4-D mask hides everything not yet (or no longer) valid. The owner moves `position` ([B] device
    tensor, so moving it costs no host sync and works between graph replays).
    """

    def __init__(self, config, max_len: int, dtype: torch.dtype, device: torch.device, batch: int = 1):
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.position = torch.zeros(batch, dtype=torch.long, device=device)

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key, value: [B, kv_heads, n, D] -> the layer's full buffers [B, kv_heads, L, D]."""
        write_rows(self.keys[layer_idx], self.position, key)
        write_rows(self.values[layer_idx], self.position, value)
        return self.keys[layer_idx], self.values[layer_idx]


class RowStaticLayer(StaticLayer):
    """A transformers `StaticLayer` whose rows write at their own cache index (`write_start` [B], shared by all
    layers and moved by the owner), instead of one shared `cumulative_length`."""

    def __init__(self, max_cache_len: int, write_start: torch.Tensor):
        super().__init__(max_cache_len=max_cache_len)
        self.write_start = write_start

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        write_rows(self.keys, self.write_start, key_states)
        write_rows(self.values, self.write_start, value_states)
        return self.keys, self.values


def row_static_cache(config, max_len: int, write_start: torch.Tensor, linear_layers: dict | None = None) -> StaticCache:
    """A transformers `StaticCache` for a target whose rows write from `write_start` [B] on.

    Only `update` differs from transformers' layer; the model gets explicit 4-D masks and position ids, so nothing
    reads the cache's own length. Hybrid targets: `linear_layers` (layer index -> `GatedDeltaNetBlockState`) stand
    at their linear-attention layers' places.
    """
    linear_layers = linear_layers or {}
    cache = StaticCache(config=config, max_cache_len=max_len)
    attention = [layer for index, layer in enumerate(cache.layers) if index not in linear_layers]
    if not all(type(layer) is StaticLayer for layer in attention):
        kinds = sorted({type(layer).__name__ for layer in attention})
        raise ValueError(
            f"dspark: static_cache=True supports full-attention layers only; this target's StaticCache has {kinds}. "
            "Use static_cache=False."
        )
    cache.layers = [
        linear_layers[index] if index in linear_layers else RowStaticLayer(max_len, write_start)
        for index in range(len(cache.layers))
    ]
    return cache


def causal_key_mask(start: torch.Tensor, first: torch.Tensor, queries: int, max_len: int) -> torch.Tensor:
    """[B, 1, queries, max_len] bool: query i of row b (at cache index start[b] + i) sees the row's entries
    first[b] .. start[b] + i (`first`: its left padding, which no real token may see).

    A padding query sees only itself, so no row of the mask is empty (an empty row would make SDPA return NaN, and
    the NaN would reach real tokens through the padding's keys and values in later layers).
    """
    keys = torch.arange(max_len, device=start.device)[None, None]
    query_index = start[:, None, None] + torch.arange(queries, device=start.device)[None, :, None]
    visible = (keys <= query_index) & (keys >= first[:, None, None])
    return (visible | (keys == query_index))[:, None]


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask -> 0 where visible, the dtype's minimum elsewhere (transformers' eager attention adds the mask)."""
    zero = torch.zeros((), dtype=dtype, device=visible.device)
    return torch.where(visible, zero, torch.finfo(dtype).min)
