"""Fixed-address caches and masks: what a forward needs so that every round has the same shapes and buffers.

CUDA graphs replay kernels on the memory addresses they were recorded with, so nothing a captured step reads or
writes may be reallocated between rounds: KV caches are preallocated to a maximum length, the write position lives in
a device tensor, and the part of the buffer a query may see is chosen by a mask rather than by slicing.

Shapes: L cache length, Q query positions, D head dim.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import StaticCache


def bucket_length(length: int, multiple: int = 128) -> int:
    """Cache lengths rounded up to a multiple: calls with slightly different prompts then share one captured graph,
    and memory-efficient SDPA wants mask rows aligned (else it pads a copy of the mask every call)."""
    return -(-length // multiple) * multiple


class StaticDraftCache:
    """Draft KV buffers at fixed addresses, used in place of a DynamicCache by `DSparkAttention`.

    `update` writes the new context + block entries at `position`, `position + 1`, ... and returns the whole buffers;
    a 4-D mask hides everything not yet (or no longer) valid. The owner moves `position` (a device tensor, so moving
    it costs no host sync and works between graph replays).
    """

    def __init__(self, config, max_len: int, dtype: torch.dtype, device: torch.device, batch: int = 1):
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.position = torch.zeros((), dtype=torch.long, device=device)

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key, value: [B, kv_heads, n, D] -> the layer's full buffers [B, kv_heads, L, D]."""
        index = self.position + torch.arange(key.shape[2], device=key.device)
        self.keys[layer_idx].index_copy_(2, index, key)
        self.values[layer_idx].index_copy_(2, index, value)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self) -> int:
        return int(self.position)


def set_static_cache_position(cache: StaticCache, position: torch.Tensor | int) -> None:
    """Make every layer of a transformers `StaticCache` write its next entries from `position` on.

    transformers' `StaticLayer` keeps its write position in the device tensor `cumulative_length` and advances it in
    place; overwriting it moves the cache back (stale entries behind it are masked, then overwritten) or forward.
    """
    for layer in cache.layers:
        if not hasattr(layer, "cumulative_length"):
            raise RuntimeError(
                f"dspark: {type(layer).__name__} has no `cumulative_length`; this transformers version's StaticCache "
                "is not supported by the static-cache loop (use static_cache=False)."
            )
        if isinstance(position, torch.Tensor):
            layer.cumulative_length.copy_(position)
        else:
            layer.cumulative_length.fill_(position)


def causal_key_mask(start: torch.Tensor | int, queries: int, max_len: int, device: torch.device) -> torch.Tensor:
    """[1, 1, queries, max_len] bool: query i (at cache index start + i) sees cache entries 0 .. start + i."""
    keys = torch.arange(max_len, device=device)[None]
    query_index = start + torch.arange(queries, device=device)[:, None]
    return (keys <= query_index)[None, None]


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask -> 0 where visible, the dtype's minimum elsewhere (transformers' eager attention adds the mask)."""
    zero = torch.zeros((), dtype=dtype, device=visible.device)
    return torch.where(visible, zero, torch.finfo(dtype).min)
