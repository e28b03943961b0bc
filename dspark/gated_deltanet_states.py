"""Hybrid targets (Qwen3.5 / 3.6: Gated DeltaNet linear attention between full-attention layers) on the static path:
the linear-attention state in fixed shapes, rolled back without a replay.

A verify forward runs Q tokens [anchor, N drafted] through every layer, yet a row keeps only its first k of them
(k = accepted + 1; none once the row finished). The dynamic loop snapshots the recurrent state before the verify and
replays the kept tokens afterwards: a forward whose shape depends on k. Here each Gated DeltaNet layer keeps what a
rollback needs from the verify itself, and the next verify step begins by committing each row's state after its k
kept tokens: fixed shapes throughout, so the verify step, commit included, is one CUDA graph, and no replay exists.

The verify runs the gated delta rule over the block in its chunked (UT transform) form: the block's corrected values
("v_new") come from a small triangular solve over the Q positions and one read of the state S0, and the state after
the first k positions is

    S_k = exp(G_k) S0 + sum_{j <= k} exp(G_k - G_j) key_j (x) v_new_j        (G: the cumulative log decay)

where v_new_j depends only on positions up to j (the system is lower-triangular), so what the verify computed for
all Q positions serves every k. A layer therefore keeps, per row, the block's normalised keys, v_new and G (a few
KiB), and its conv window: the K - 1 conv inputs before the block and the block's Q inputs, [B, C, K - 1 + Q], whose
columns k .. k + K - 2 are the conv state after k tokens. A round reads each recurrent state twice (verify, commit)
and writes it once, however long the block.

The prefill runs transformers' own forward (its chunked kernels; fla's where installed) into a `DynamicCache`;
`load_prefill` moves its states into the fixed buffers. The verify forward of a layer (`block_forward`) is ours,
written from transformers' Qwen3.5 layer (same projections, conv, gating and delta rule), because transformers' layer
exposes only the state after a forward's last position; a test holds the two equal. It is installed on the layer
modules only during the verify step (`GatedDeltaNetStates.installed`), and hands every call whose cache entry is not
ours to the layer's own forward.

Shapes: B rows, Q verified positions, C = 2 * Hk * Dk + Hv * Dv conv channels, K conv kernel width, Hk / Hv key /
value heads, Dk / Dv their widths.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .installed_forwards import installed_forwards

# What `block_forward` reads from a layer module (transformers' Qwen3.5 / Qwen3.5-MoE Gated DeltaNet).
GATED_DELTANET_PARTS = (
    "in_proj_qkv",
    "in_proj_z",
    "in_proj_b",
    "in_proj_a",
    "conv1d",
    "dt_bias",
    "A_log",
    "norm",
    "out_proj",
    "head_k_dim",
    "head_v_dim",
    "num_k_heads",
    "num_v_heads",
    "conv_kernel_size",
    "activation",
)


def linear_attention_layer_ids(target: nn.Module) -> list[int]:
    kinds = getattr(target.config.get_text_config(), "layer_types", None) or []
    return [index for index, kind in enumerate(kinds) if kind == "linear_attention"]


def gated_deltanet_modules(target: nn.Module) -> dict[int, nn.Module]:
    """Layer index -> the Gated DeltaNet module of each linear-attention layer `block_forward` can run.

    Raises a ValueError naming what is missing when a linear-attention layer is of another kind (Mamba, Qwen3-Next's
    fused projections, ...): the static path cannot roll those back."""
    wanted = linear_attention_layer_ids(target)
    found = {}
    for module in target.modules():
        index = getattr(module, "layer_idx", None)
        if index in wanted and index not in found and hasattr(module, "A_log"):
            found[index] = module
    missing_layers = [index for index in wanted if index not in found]
    partial = {
        index: [part for part in GATED_DELTANET_PARTS if not hasattr(module, part)] for index, module in found.items()
    }
    partial = {index: parts for index, parts in partial.items() if parts}
    if missing_layers or partial:
        kinds = sorted({type(module).__name__ for module in found.values()}) or ["none found"]
        raise ValueError(
            "dspark: static_cache=True runs Qwen3.5-style Gated DeltaNet linear-attention layers (separate "
            f"in_proj_qkv / in_proj_z / in_proj_b / in_proj_a projections); this target's linear-attention layers "
            f"({', '.join(kinds)}) are not of that kind (layers without one: {missing_layers}; missing parts: "
            f"{partial}). Use static_cache=False (the dynamic loop snapshots and replays any recurrent state)."
        )
    return found


class GatedDeltaNetBlockState:
    """One Gated DeltaNet layer's entry in the static path's target cache: its committed state and what the last
    verify block left for the next commit. `kept` [B] is shared by all layers and set by the runner: how many of
    the last verify block's entries each row keeps (0: none, or no block since the prefill)."""

    def __init__(self, module: nn.Module, batch: int, queries: int, kept: torch.Tensor, dtype: torch.dtype):
        device = kept.device
        channels, width = module.conv1d.weight.shape[0], module.conv_kernel_size
        heads, key_width, value_width = module.num_v_heads, module.head_k_dim, module.head_v_dim
        self.kept = kept
        self.conv = torch.zeros(batch, channels, width - 1, dtype=dtype, device=device)
        self.window = torch.zeros(batch, channels, width - 1 + queries, dtype=dtype, device=device)
        self.recurrent = torch.zeros(batch, heads, key_width, value_width, dtype=torch.float32, device=device)
        # the last block's normalised keys, corrected values and cumulative log decay (float32)
        self.block_keys = torch.zeros(batch, heads, queries, key_width, dtype=torch.float32, device=device)
        self.block_values = torch.zeros(batch, heads, queries, value_width, dtype=torch.float32, device=device)
        self.block_decay = torch.zeros(batch, heads, queries, dtype=torch.float32, device=device)

    def commit(self) -> None:
        """Move each row to its state after the kept entries of the last verify block (rows that keep none stay)."""
        took = self.kept > 0
        last = (self.kept - 1).clamp(min=0)[:, None, None].expand(-1, self.block_decay.shape[1], 1)
        decay_to_last = self.block_decay.gather(2, last)  # [B, Hv, 1]: G at the last kept position
        positions = torch.arange(self.block_decay.shape[2], device=self.kept.device)
        in_kept = (positions[None] < self.kept[:, None])[:, None, :]  # [B, 1, Q]
        weights = torch.where(in_kept, (decay_to_last - self.block_decay).exp(), 0.0)  # [B, Hv, Q]
        written = (self.block_keys * weights[..., None]).transpose(-1, -2) @ self.block_values  # [B, Hv, Dk, Dv]
        after = self.recurrent * decay_to_last.exp()[..., None] + written
        self.recurrent.copy_(torch.where(took[:, None, None, None], after, self.recurrent))
        columns = self.kept[:, None] + torch.arange(self.conv.shape[2], device=self.kept.device)
        shifted = self.window.gather(2, columns[:, None, :].expand(-1, self.conv.shape[1], -1))
        self.conv.copy_(torch.where(took[:, None, None], shifted, self.conv))

    def load_prefill(self, conv_state: torch.Tensor, recurrent_state: torch.Tensor) -> None:
        """Take a transformers cache layer's states after the prefill (its conv state keeps K columns, one more than
        the next token needs)."""
        self.conv.copy_(conv_state[:, :, -self.conv.shape[2] :])
        self.recurrent.copy_(recurrent_state)


def l2_normalized(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / |x| along the last axis, in the form fla and transformers use (so the two paths round alike)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def gated_delta_block(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    decay: torch.Tensor,
    beta: torch.Tensor,
    state: GatedDeltaNetBlockState,
) -> torch.Tensor:
    """The gated delta rule over a block of Q positions from the committed state [B, Hv, Dk, Dv] (read, not
    changed); returns the outputs [B, Q, Hv, Dv] in value's dtype and leaves in `state` what its commit needs.

    query, key: [B, Q, Hv, Dk] (heads already repeated to Hv); value: [B, Q, Hv, Dv]; decay (log of the state's
    per-position decay), beta: [B, Q, Hv]. The chunked form of transformers' `torch_chunk_gated_delta_rule` (one
    chunk of exactly Q positions).
    """
    dtype, positions = value.dtype, value.shape[1]
    query, key, value, beta, decay = (
        x.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        for x in (query, key, value, beta, decay)
    )  # [B, Hv, Q, ...]
    query = l2_normalized(query) * query.shape[-1] ** -0.5
    key = l2_normalized(key)
    cumulative = decay.cumsum(dim=-1)  # G
    later = torch.ones(positions, positions, dtype=torch.bool, device=query.device).triu(1)
    pair_decay = (cumulative[..., :, None] - cumulative[..., None, :]).masked_fill(later, float("-inf")).exp()
    key_beta = key * beta[..., None]
    system = (key_beta @ key.transpose(-1, -2)) * pair_decay  # its strict lower triangle couples the positions
    corrected, reads = value * beta[..., None], key_beta * cumulative.exp()[..., None]
    if positions > 1:  # one position (plain decoding) is its own solution: its system is the 1 x 1 identity
        corrected = torch.linalg.solve_triangular(system, corrected, upper=False, unitriangular=True)
        reads = torch.linalg.solve_triangular(system, reads, upper=False, unitriangular=True)
    # One read of the state for both: what it predicts of each position's value, and each query's view of it.
    from_state = torch.cat([reads, query * cumulative.exp()[..., None]], dim=2) @ state.recurrent
    new_values = corrected - from_state[:, :, :positions]
    within = (query @ key.transpose(-1, -2)) * pair_decay
    outputs = from_state[:, :, positions:] + within @ new_values
    state.block_keys.copy_(key)
    state.block_values.copy_(new_values)
    state.block_decay.copy_(cumulative)
    return outputs.transpose(1, 2).contiguous().to(dtype)


def block_forward(module: nn.Module, state: GatedDeltaNetBlockState, hidden_states: torch.Tensor) -> torch.Tensor:
    """hidden_states [B, Q, H] -> [B, Q, H]: a Gated DeltaNet layer over a verify block from each row's committed
    state (committed first, from the previous block), leaving in `state` what the next commit needs."""
    state.commit()
    batch, queries, _ = hidden_states.shape
    mixed = module.in_proj_qkv(hidden_states).transpose(1, 2)  # [B, C, Q]
    gate = module.in_proj_z(hidden_states).reshape(batch, queries, -1, module.head_v_dim)
    beta = module.in_proj_b(hidden_states).sigmoid()
    # float32 before exp: in half precision A could overflow to inf
    decay = -module.A_log.float().exp() * F.softplus(module.in_proj_a(hidden_states).float() + module.dt_bias)

    window = torch.cat([state.conv, mixed], dim=2)
    state.window.copy_(window)
    weight = module.conv1d.weight  # [C, 1, K]: depthwise
    convolved = F.conv1d(window.to(weight.dtype), weight, module.conv1d.bias, groups=weight.shape[0])
    mixed = ACT2FN[module.activation](convolved).to(hidden_states.dtype).transpose(1, 2)  # [B, Q, C]

    key_dim = module.num_k_heads * module.head_k_dim
    query, key, value = torch.split(mixed, [key_dim, key_dim, mixed.shape[-1] - 2 * key_dim], dim=-1)
    query = query.reshape(batch, queries, -1, module.head_k_dim)
    key = key.reshape(batch, queries, -1, module.head_k_dim)
    value = value.reshape(batch, queries, -1, module.head_v_dim)
    repeats = module.num_v_heads // module.num_k_heads  # each key head serves this many consecutive value heads
    if repeats > 1:
        query, key = query.repeat_interleave(repeats, dim=2), key.repeat_interleave(repeats, dim=2)

    out = gated_delta_block(query, key, value, decay, beta, state)
    out = module.norm(out.reshape(-1, module.head_v_dim), gate.reshape(-1, module.head_v_dim))
    return module.out_proj(out.reshape(batch, queries, -1))


def _dispatching_forward(module, hidden_states, cache=None, cache_params=None, attention_mask=None, **kwargs):
    """A Gated DeltaNet module's forward while installed: ours for our cache entries, the module's own otherwise."""
    given = cache if cache is not None else cache_params
    entry = given.layers[module.layer_idx] if given is not None else None
    if isinstance(entry, GatedDeltaNetBlockState):
        return block_forward(module, entry, hidden_states)  # a verify block: no padding to mask
    spelled = {}  # the cache as the caller passed it: `cache` (transformers 5.2x) or `cache_params` (5.17)
    if cache is not None:
        spelled["cache"] = cache
    elif cache_params is not None:
        spelled["cache_params"] = cache_params
    return type(module).forward(module, hidden_states, attention_mask=attention_mask, **spelled, **kwargs)


class GatedDeltaNetStates:
    """Every Gated DeltaNet layer's block state for one (target, batch, Q), and the forwards that use them."""

    def __init__(self, target: nn.Module, batch: int, queries: int):
        self.modules = gated_deltanet_modules(target)
        self.kept = torch.zeros(batch, dtype=torch.long, device=target.device)
        self.layers = {
            index: GatedDeltaNetBlockState(module, batch, queries, self.kept, target.dtype)
            for index, module in self.modules.items()
        }
        # One bound forward per module, made once (see `installed_forwards`).
        self.forwards = {module: types.MethodType(_dispatching_forward, module) for module in self.modules.values()}

    def installed(self):
        """Route the layers' forwards through `_dispatching_forward` for the duration (re-entrant)."""
        return installed_forwards(self.forwards)

    def load_prefill(self, cache) -> None:
        """Take the linear states a transformers cache holds after the prefill; the first verify commits nothing."""
        for index, state in self.layers.items():
            layer = cache.layers[index]
            state.load_prefill(layer.conv_states[0], layer.recurrent_states[0])
        self.kept.zero_()
