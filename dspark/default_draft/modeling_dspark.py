"""DSpark draft model: a DFlash block-diffusion backbone with DSpark's sequential Markov head and confidence head.

One forward drafts a whole block `[anchor, MASK x (block_size - 1)]`, conditioned on hidden states of the target
model injected as extra keys/values in every draft layer. The Markov head then corrects the block's logits left to
right with a low-rank bigram bias on the previously drafted token, and the confidence head predicts, per slot, the
chance that the target accepts it.

This file travels with every checkpoint as remote code (`trust_remote_code=True`): it imports only torch,
transformers and `.configuration_dspark`, so a user without the `dspark` package can load a draft.

Shapes: B = batch, S = block slots, C = new context positions, K = number of target layers read, H = hidden size,
V = vocabulary, N = drafted tokens per round (`config.num_draft_tokens`).
"""

from __future__ import annotations

import importlib
import inspect
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import LogitsProcessorList
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils import ModelOutput

from .configuration_dspark import DSparkConfig

try:  # FlexAttention (torch >= 2.5) runs the packed training blocks without a dense mask
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - older torch: dense masks only
    BlockMask = flex_attention = None
_COMPILED_FLEX_ATTENTION = None

# ----------------------------------------------------------------------------------------------------------------
# Target features
# ----------------------------------------------------------------------------------------------------------------


def cache_keyword(model: nn.Module) -> str:
    """The keyword a model's forward takes its cache under: `cache` since transformers 5.2x, else `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def extract_target_features(
    hidden_states: tuple[torch.Tensor | None, ...], target_layer_ids: list[int]
) -> torch.Tensor:
    """Concatenate the selected target layers from HF `output_hidden_states=True` outputs.

    `hidden_states[0]` is the embedding output, so layer i is read at `hidden_states[i + 1]` (and -1 at index 0).
    Returns [B, T, K * H_target].
    """
    return torch.cat([hidden_states[i + 1] for i in target_layer_ids], dim=-1)


def target_decoder_layers(target: nn.Module) -> nn.ModuleList:
    """The decoder layers of a HF causal LM (Llama, Qwen3, ...), or a clear error."""
    decoder = target.get_decoder() if hasattr(target, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"dspark: cannot find the decoder layers of {type(target).__name__} "
            "(expected target.get_decoder().layers). Supported targets are HF decoder-only causal LMs "
            "such as Llama, Qwen2/3 and Mistral."
        )
    return layers


def target_is_stateful(target: nn.Module) -> bool:
    """True for targets with recurrent state (Qwen3.5/3.6 linear attention, Mamba hybrids), which cannot be cropped."""
    if getattr(target, "_is_stateful", False):
        return True
    text_config = target.config.get_text_config()
    layer_types = getattr(text_config, "layer_types", None) or []
    return any(kind not in ("full_attention", "sliding_attention", "chunked_attention") for kind in layer_types)


@dataclass
class CapturedFeatures:
    """Target features captured from one target forward: positions [start, start + T)."""

    start: int
    token_ids: torch.Tensor | None  # [1, T], or None when the target was fed embeddings
    features: torch.Tensor  # [1, T, K * H_target]

    def take(self, begin: int, end: int, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Features for positions [begin, end) if this capture covers them for the sequence `input_ids`."""
        if self.token_ids is None or begin < self.start:
            return None
        stop = self.start + self.token_ids.shape[1]
        if end > stop or end > input_ids.shape[1]:
            return None
        # Hidden states of rejected candidates are computed too; only positions whose tokens are still in the
        # sequence (the accepted prefix) are valid.
        if not torch.equal(self.token_ids[:, : end - self.start], input_ids[:, self.start : end].to(self.token_ids)):
            return None
        return self.features[:, begin - self.start : end - self.start]


class TargetFeatureTap:
    """One-shot forward hooks that record the target's selected hidden states during its next forward.

    Armed by the draft right before it hands candidates to `target.generate`, so the very next target forward is the
    verification of those candidates. The hooks remove themselves when that forward ends: nothing stays attached to
    the target between rounds or after generation.
    """

    def __init__(self, target: nn.Module, target_layer_ids: list[int], on_capture: Callable[[CapturedFeatures], None]):
        layers = target_decoder_layers(target)
        decoder = target.get_decoder()
        last = len(layers) - 1
        self.target = target
        self.on_capture = on_capture
        self.sources: list[nn.Module] = []
        for layer_id in target_layer_ids:
            if layer_id == -1:
                self.sources.append(target.get_input_embeddings())
            elif layer_id == last:
                # HF's hidden_states[-1] is the post-norm last hidden state; training used that convention.
                self.sources.append(decoder.norm)
            else:
                self.sources.append(layers[layer_id])
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.outputs: dict[int, torch.Tensor] = {}
        self.start = 0
        self.token_ids: torch.Tensor | None = None

    @property
    def armed(self) -> bool:
        return bool(self.handles)

    def arm(self) -> None:
        self.disarm()
        self.handles.append(self.target.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        for index, module in enumerate(self.sources):
            self.handles.append(module.register_forward_hook(self._record(index)))
        self.handles.append(self.target.register_forward_hook(self._after_forward))

    def disarm(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.outputs.clear()

    def _before_forward(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers renamed the argument in 5.2x
        self.start = cache.get_seq_length() if isinstance(cache, Cache) else 0
        self.token_ids = input_ids.detach() if isinstance(input_ids, torch.Tensor) else None
        self.outputs.clear()

    def _record(self, index: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            self.outputs[index] = hidden.detach()

        return hook

    def _after_forward(self, module, args, output):
        try:
            if len(self.outputs) == len(self.sources):
                features = torch.cat([self.outputs[i] for i in range(len(self.sources))], dim=-1)
                self.on_capture(CapturedFeatures(self.start, self.token_ids, features))
        finally:
            self.disarm()


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


class DSparkRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        hidden_states = hidden_states.float()
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(dtype)


def rope_inverse_frequencies(rope_parameters: dict, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse RoPE frequencies [head_dim / 2] and the attention scaling for the supported rope types."""
    rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
    base = float(rope_parameters["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / float(rope_parameters["factor"]), 1.0
    if rope_type == "llama3":
        factor = float(rope_parameters["factor"])
        low_freq_factor = float(rope_parameters["low_freq_factor"])
        high_freq_factor = float(rope_parameters["high_freq_factor"])
        original_length = float(rope_parameters["original_max_position_embeddings"])
        wavelength = 2 * math.pi / inv_freq
        low_freq_wavelength = original_length / low_freq_factor
        high_freq_wavelength = original_length / high_freq_factor
        scaled = torch.where(wavelength > low_freq_wavelength, inv_freq / factor, inv_freq)
        smooth = (original_length / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
        return torch.where(medium, blended, scaled), 1.0
    raise ValueError(
        f"dspark: rope_type {rope_type!r} is not supported by the draft (supported: default, linear, llama3). "
        "Set the draft's rope_parameters to one of those."
    )


class DSparkRotaryEmbedding(nn.Module):
    # The frequencies are derived from the config on first use rather than stored as a buffer: transformers builds
    # models on the meta device when loading, and a non-persistent buffer would never be materialised.
    def __init__(self, config: DSparkConfig):
        super().__init__()
        self.rope_parameters = dict(config.rope_parameters)
        self.head_dim = config.head_dim
        self._inv_freq: torch.Tensor | None = None
        self.attention_scaling = 1.0

    def inverse_frequencies(self, device: torch.device) -> torch.Tensor:
        if self._inv_freq is None or self._inv_freq.device != device:
            inv_freq, self.attention_scaling = rope_inverse_frequencies(self.rope_parameters, self.head_dim)
            self._inv_freq = inv_freq.to(device)
        return self._inv_freq

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [B, T, head_dim] for absolute positions [B, T]."""
        angles = position_ids[..., None].float() * self.inverse_frequencies(position_ids.device)
        angles = torch.cat([angles, angles], dim=-1)
        return (angles.cos() * self.attention_scaling).to(dtype), (angles.sin() * self.attention_scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, D]; cos/sin: [B, T, D]."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class DSparkMLP(nn.Module):
    def __init__(self, config: DSparkConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DSparkAttention(nn.Module):
    """KV-injection attention: queries from the block only; keys/values from [target context ; block].

    The context and the block share k_proj/v_proj. Attention is bidirectional inside the block and over all context
    (the context holds only positions strictly before the anchor).
    """

    def __init__(self, config: DSparkConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = DSparkRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = DSparkRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.sliding_window = config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None

    def _heads(self, states: torch.Tensor, proj: nn.Linear, heads: int) -> torch.Tensor:
        batch, length, _ = states.shape
        return proj(states).view(batch, length, heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        block: torch.Tensor,
        context: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        """block [B, S, H], context [B, C, H], cos/sin [B, C + S, D], key_mask bool [B, 1, S, kv] or None."""
        batch, slots, _ = block.shape
        kv_input = torch.cat([context, block], dim=1)
        query = self.q_norm(self._heads(block, self.q_proj, self.num_heads))
        key = self.k_norm(self._heads(kv_input, self.k_proj, self.num_kv_heads))
        value = self._heads(kv_input, self.v_proj, self.num_kv_heads)
        query = apply_rotary(query, cos[:, -slots:], sin[:, -slots:])
        key = apply_rotary(key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        if self.sliding_window is not None:
            key_mask = _and_masks(
                key_mask, _sliding_window_mask(slots, key.shape[2], self.sliding_window, block.device)
            )
        grouped = self.num_heads != self.num_kv_heads
        if is_block_mask(key_mask):
            attended = run_flex_attention(query, key, value, key_mask, grouped)
        else:
            attended = F.scaled_dot_product_attention(
                query, key, value, attn_mask=key_mask, is_causal=False, enable_gqa=grouped
            )
        return self.o_proj(attended.transpose(1, 2).reshape(batch, slots, -1))


def is_block_mask(mask) -> bool:
    return BlockMask is not None and isinstance(mask, BlockMask)


def run_flex_attention(query, key, value, block_mask, grouped: bool) -> torch.Tensor:
    """FlexAttention, compiled once on CUDA (uncompiled it materialises the scores; on CPU it is a slow reference)."""
    global _COMPILED_FLEX_ATTENTION
    function = flex_attention
    if query.is_cuda:
        if _COMPILED_FLEX_ATTENTION is None:
            _COMPILED_FLEX_ATTENTION = torch.compile(flex_attention)
        function = _COMPILED_FLEX_ATTENTION
    return function(query, key, value, block_mask=block_mask, enable_gqa=grouped)


def _sliding_window_mask(slots: int, kv_length: int, window: int, device: torch.device) -> torch.Tensor:
    """Queries are the last `slots` cache entries; a key is visible if it is fewer than `window` steps behind."""
    query_index = torch.arange(kv_length - slots, kv_length, device=device)[:, None]
    key_index = torch.arange(kv_length, device=device)[None, :]
    return (query_index - key_index < window)[None, None]


def _and_masks(first: torch.Tensor | None, second: torch.Tensor) -> torch.Tensor:
    return second if first is None else first & second


class DSparkDecoderLayer(nn.Module):
    def __init__(self, config: DSparkConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = DSparkRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = DSparkAttention(config, layer_idx)
        self.post_attention_layernorm = DSparkRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = DSparkMLP(config)

    def forward(self, block, context, cos, sin, key_mask, cache):
        block = block + self.self_attn(self.input_layernorm(block), context, cos, sin, key_mask, cache)
        return block + self.mlp(self.post_attention_layernorm(block))


class DSparkMarkovHead(nn.Module):
    """Low-rank first-order bias on the next token's logits: W2(W1[x_prev]) (vanilla) or gated by the hidden state.

    Parameter names follow DeepSpec (`markov_w1`, `markov_w2`, `gate_proj`).
    """

    def __init__(self, config: DSparkConfig):
        super().__init__()
        rank = config.markov_rank
        self.markov_w1 = nn.Embedding(config.vocab_size, rank)
        self.markov_w2 = nn.Linear(rank, config.vocab_size, bias=False)
        # A zero W2 makes a fresh Markov head a no-op: training starts from the plain DFlash draft.
        self.markov_w2.zero_init = True
        self.gated = config.markov_head_type == "gated"
        if self.gated:
            self.gate_proj = nn.Linear(config.hidden_size + rank, rank)

    def forward(self, previous_tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """previous_tokens [...], hidden [..., H] -> bias [..., V]."""
        embedded = self.markov_w1(previous_tokens)
        if self.gated:
            embedded = torch.sigmoid(self.gate_proj(torch.cat([hidden, embedded.to(hidden.dtype)], -1))) * embedded
        return self.markov_w2(embedded.to(self.markov_w2.weight.dtype))


class DSparkConfidenceHead(nn.Module):
    """Per-slot acceptance logit from [h_k ; W1[x_{k-1}]] (or h_k alone), computed in float32."""

    def __init__(self, config: DSparkConfig):
        super().__init__()
        extra = config.markov_rank if config.confidence_head_with_markov else 0
        self.with_markov = bool(extra)
        self.proj = nn.Linear(config.hidden_size + extra, 1)

    def forward(self, hidden: torch.Tensor, markov_embedding: torch.Tensor | None) -> torch.Tensor:
        features = torch.cat([hidden, markov_embedding], -1) if self.with_markov else hidden
        return F.linear(features.float(), self.proj.weight.float(), self.proj.bias.float()).squeeze(-1)


# ----------------------------------------------------------------------------------------------------------------
# Outputs and the Markov sampling step
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class DSparkDraftOutput(ModelOutput):
    """Output of `DSparkDraftModel.forward`.

    last_hidden_state: [B, 1 + N, H], the DFlash contract of transformers' `speculation_type="dflash"`:
        `last_hidden_state[:, 1:]` are the N drafting slots whatever the slot convention.
    draft_hidden_states: [B, N, H], entry j predicts the j-th drafted token (position anchor + 1 + j).
    cache: the draft cache, holding the context keys/values and (until cropped) the block's.
    """

    last_hidden_state: torch.Tensor | None = None
    draft_hidden_states: torch.Tensor | None = None
    cache: Cache | None = None


def accept_prefix(matches: torch.Tensor) -> torch.Tensor:
    """[B, N] per-slot flags -> [B] length of each row's leading run of True (a rejection ends the accepted block,
    a low confidence ends the proposed one)."""
    return matches.long().cumprod(dim=1).sum(dim=1)


def confidence_stop_lengths(confidence: torch.Tensor, threshold: float, rule: str) -> torch.Tensor:
    """[B, n] per-slot acceptance confidences -> [B] tokens each row proposes (1 .. n).

    A row stops at the first slot k > 0 whose score falls below `threshold`: the slot's own confidence
    (rule "position") or the probability that every slot up to it is accepted, their running product ("survival").
    Every row proposes at least one token. No host sync, so it also runs inside captured CUDA graphs.
    """
    score = confidence if rule == "position" else confidence.cumprod(dim=-1)
    keep = score >= threshold
    keep[:, 0] = True
    return accept_prefix(keep)


@dataclass
class DraftBlock:
    """Tokens proposed in one round.

    tokens: [B, n] drafted ids; q_logits: [B, n, V] float32, the exact (processed) logits each token was drawn from,
    which verification must use as q; confidence: [B, n] acceptance probabilities or None; lengths: [B] tokens each row
    proposes after the confidence stop (at least 1).
    """

    tokens: torch.Tensor
    q_logits: torch.Tensor
    confidence: torch.Tensor | None
    lengths: torch.Tensor


TokenChooser = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""Maps corrected logits [B, V] (float32) to (processed logits q [B, V], chosen tokens [B]), in drafting order."""


class ProcessorTokenChooser:
    """Token choice through HF logits processors on the running sequence: argmax, or a draw from softmax(q)."""

    def __init__(self, sequence: torch.Tensor, processors: LogitsProcessorList | None, do_sample: bool):
        self.sequence = sequence
        self.processors = processors if processors is not None else LogitsProcessorList()
        self.do_sample = do_sample

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        processed = self.processors(self.sequence, logits)
        if self.do_sample:
            tokens = torch.multinomial(torch.softmax(processed, dim=-1), num_samples=1).squeeze(-1)
        else:
            tokens = processed.argmax(dim=-1)
        self.sequence = torch.cat([self.sequence, tokens[:, None]], dim=-1)
        return processed, tokens


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------


class DSparkPreTrainedModel(PreTrainedModel):
    config_class = DSparkConfig
    base_model_prefix = ""
    main_input_name = "noise_embeds"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DSparkDecoderLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "zero_init", False):
                module.weight.zero_()
            else:
                module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, DSparkRMSNorm):
            module.weight.fill_(1.0)


class DSparkDraftModel(DSparkPreTrainedModel, GenerationMixin):
    """DSpark/DFlash draft model.

    Two ways to use it with `target.generate`:
      * `draft.bind_target(target)` then `target.generate(ids, assistant_model=draft)`: the draft's own `generate`
        runs the Markov head, sampling and logits processors, reporting the exact q it sampled from.
      * `target.generate(ids, assistant_model=draft, speculation_type="dflash")`: transformers' built-in DFlash path
        calls `forward` directly (no Markov head there).
    """

    def __init__(self, config: DSparkConfig):
        super().__init__(config)
        self.layers = nn.ModuleList(DSparkDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DSparkRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.fc = nn.Linear(len(config.target_layer_ids) * config.target_hidden_size, config.hidden_size, bias=False)
        self.hidden_norm = DSparkRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DSparkRotaryEmbedding(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size) if config.has_embed_tokens else None
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if config.has_lm_head else None
        self.markov_head = DSparkMarkovHead(config) if config.markov_rank > 0 else None
        self.confidence_head = DSparkConfidenceHead(config) if config.enable_confidence_head else None
        self._target_ref: weakref.ref | None = None
        self._tap: TargetFeatureTap | None = None
        self._reset_drafting_state()
        self.post_init()
        self.generation_config.num_assistant_tokens = config.num_draft_tokens
        self.generation_config.num_assistant_tokens_schedule = "constant"
        self.generation_config.assistant_confidence_threshold = 0.0

    # -- construction ---------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained` that refuses partial or corrupt weights instead of re-initialising them.

        A draft with a missing or stray tensor would silently propose garbage, so missing, unexpected and
        mismatched keys are errors here.
        """
        wants_info = kwargs.pop("output_loading_info", False)
        source = str(pretrained_model_name_or_path)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
        except OSError as error:
            raise FileNotFoundError(
                f"dspark: cannot load draft weights from {source}: {error} Re-download the checkpoint, or convert an "
                "upstream one with `dspark convert SRC DST`."
            ) from error
        except Exception as error:
            if "Safetensor" in type(error).__name__:
                raise ValueError(
                    f"dspark: the draft weights in {source} are corrupt or truncated ({error}). Re-download or "
                    "re-convert the checkpoint."
                ) from error
            if "mismatched_sizes" in str(error) or "size mismatch" in str(error):
                raise ValueError(
                    f"dspark: the weights in {source} do not match its config.json (tensor shapes differ: {error}). "
                    "config.json and the weights belong to different drafts."
                ) from error
            raise
        problems = {kind: sorted(info.get(kind) or []) for kind in ("missing_keys", "unexpected_keys")}
        if any(problems.values()):
            details = "; ".join(f"{kind.replace('_', ' ')}: {keys[:6]}" for kind, keys in problems.items() if keys)
            raise ValueError(
                f"dspark: the checkpoint in {source} does not match its config ({details}). The weights are incomplete "
                "or from another layout; upstream z-lab/DeepSpec/TorchSpec checkpoints must be imported with "
                "`dspark convert SRC DST`."
            )
        return (model, info) if wants_info else model

    @classmethod
    def from_target(
        cls,
        target: PreTrainedModel,
        num_hidden_layers: int = 1,
        block_size: int = 8,
        target_layer_ids: list[int] | None = None,
        num_target_features: int = 5,
        mask_token_id: int | None = None,
        markov_rank: int = 0,
        **config_overrides,
    ) -> DSparkDraftModel:
        """A fresh (untrained) draft sized for `target`, bound to it (hybrid targets included, for the own loop).

        The draft copies the target's attention/MLP shapes, RoPE and vocabulary size. Without explicit
        `target_layer_ids`, `num_target_features` layers are spread evenly over the target's depth.
        `mask_token_id` defaults to the last row of the target's embedding.
        """
        text = target.config.get_text_config()
        num_layers = text.num_hidden_layers
        if target_layer_ids is None:
            target_layer_ids = spread_layer_ids(num_layers, num_target_features)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        config = DSparkConfig(
            vocab_size=text.vocab_size,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=text.num_attention_heads,
            num_key_value_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            head_dim=head_dim,
            hidden_act=getattr(text, "hidden_act", "silu"),
            rms_norm_eps=getattr(text, "rms_norm_eps", 1e-6),
            rope_parameters=getattr(text, "rope_parameters", None)
            or {"rope_type": "default", "rope_theta": getattr(text, "rope_theta", 10000.0)},
            max_position_embeddings=getattr(text, "max_position_embeddings", 32768),
            block_size=block_size,
            target_layer_ids=target_layer_ids,
            target_hidden_size=text.hidden_size,
            num_target_layers=num_layers,
            mask_token_id=text.vocab_size - 1 if mask_token_id is None else mask_token_id,
            markov_rank=markov_rank,
            **config_overrides,
        )
        draft = cls(config).to(device=target.device, dtype=target.dtype)
        return draft.bind_target(target, allow_stateful=True)

    # -- the target ------------------------------------------------------------------------------------------------

    def bind_target(self, target: PreTrainedModel, allow_stateful: bool = False) -> DSparkDraftModel:
        """Check that `target` fits this draft and remember it (weakly) as the source of features/embeddings.

        Binding attaches nothing to the target: hooks are armed only between a drafting round and the target's next
        forward, and remove themselves. Returns the draft, so `draft = AutoModel.from_pretrained(...).bind_target(t)`.
        Stateful (hybrid) targets are refused unless `allow_stateful=True` (the package's own loop handles them;
        transformers' assisted generation cannot).
        """
        self.check_target(target, allow_stateful=allow_stateful)
        self.unbind_target()
        self._target_ref = weakref.ref(target)
        return self

    def unbind_target(self) -> None:
        if self._tap is not None:
            self._tap.disarm()
        self._tap = None
        self._target_ref = None
        self._reset_drafting_state()

    @property
    def target(self) -> PreTrainedModel | None:
        return self._target_ref() if self._target_ref is not None else None

    def check_target(self, target: PreTrainedModel, allow_stateful: bool = False) -> None:
        """Raise a ValueError if `target` cannot be served by this draft (vocab, sizes, layer ids, statefulness)."""
        config = self.config
        text = target.config.get_text_config()
        name = type(target).__name__
        if text.vocab_size != config.vocab_size:
            raise ValueError(
                f"dspark: vocabulary mismatch: the draft was built for vocab_size={config.vocab_size}, the target "
                f"{name} has vocab_size={text.vocab_size}. Use a draft trained for this target (or build one with "
                "DSparkDraftModel.from_target(target))."
            )
        embedding = target.get_input_embeddings()
        if text.hidden_size != config.target_hidden_size or embedding.weight.shape[1] != config.hidden_size:
            raise ValueError(
                f"dspark: hidden size mismatch: the draft expects target hidden size {config.target_hidden_size} "
                f"(embedding width {config.hidden_size}), the target {name} has {text.hidden_size}. "
                "The draft must be built for a target of the same width."
            )
        num_layers = len(target_decoder_layers(target))
        bad = [i for i in config.target_layer_ids if not -1 <= i < num_layers]
        if bad:
            raise ValueError(
                f"dspark: target_layer_ids {bad} are out of range for the target {name} with {num_layers} layers "
                f"(valid: -1 .. {num_layers - 1}). The draft was made for a different target depth."
            )
        if config.mask_token_id >= embedding.weight.shape[0]:
            raise ValueError(
                f"dspark: mask_token_id={config.mask_token_id} is outside the target's embedding table "
                f"({embedding.weight.shape[0]} rows). Set config.mask_token_id to a valid target token id."
            )
        if target_is_stateful(target) and not allow_stateful:
            raise ValueError(
                f"dspark: the target {name} keeps recurrent (linear-attention) state, which transformers' assisted "
                "generation cannot roll back. Use the package's own loop instead: "
                "dspark.speculative_generate(target, draft, input_ids, ...)."
            )

    def input_embeddings(self) -> nn.Module:
        """The embedding used for the block: the checkpoint's own, else the bound target's."""
        if self.embed_tokens is not None:
            return self.embed_tokens
        return self._require_target("embed the block").get_input_embeddings()

    def output_head(self) -> nn.Module:
        """The lm_head for draft logits: the checkpoint's own, else the bound target's."""
        if self.lm_head is not None:
            return self.lm_head
        return self._require_target("compute draft logits").get_output_embeddings()

    def _require_target(self, purpose: str) -> PreTrainedModel:
        target = self.target
        if target is None and self._target_ref is not None:
            raise ValueError(
                f"dspark: the draft needs its target model to {purpose}, but the bound target no longer exists (the "
                "draft holds it weakly so it never keeps a large model alive). Keep a reference to the target."
            )
        if target is None:
            raise ValueError(
                f"dspark: the draft needs its target model to {purpose}. Call `draft.bind_target(target)` once before "
                "`target.generate(..., assistant_model=draft)`, or use transformers' built-in DFlash path with "
                "`speculation_type='dflash'` (no Markov head)."
            )
        return target

    # -- backbone --------------------------------------------------------------------------------------------------

    def project_context(self, context_hidden_states: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Raw concatenated target features [B, C, K * H_t] -> fused context [B, C, H]."""
        if context_hidden_states is None:
            return self.norm.weight.new_zeros(batch, 0, self.config.hidden_size)
        width = context_hidden_states.shape[-1]
        if width != self.fc.in_features:
            raise ValueError(
                f"dspark: target features have width {width}, but the draft expects "
                f"{len(self.config.target_layer_ids)} layers x {self.config.target_hidden_size} "
                f"= {self.fc.in_features}. "
                "The target's hidden size or the selected layers do not match this draft."
            )
        return self.hidden_norm(self.fc(context_hidden_states.to(self.fc.weight.dtype)))

    def forward(
        self,
        noise_embeds: torch.Tensor,
        context_hidden_states: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> DSparkDraftOutput:
        """Run the backbone on one block per row.

        noise_embeds: [B, S, H] embedded block `[anchor, MASK, ...]`.
        context_hidden_states: [B, C, K * H_t] target features of positions not yet in `cache`.
        position_ids: [B, C + S] absolute positions of the new context then the block (default: continue the cache).
        attention_mask: None, a [B, kv] 0/1 key mask over cache + new entries, a bool [B, 1, S, kv] mask, or a
            FlexAttention BlockMask over [S, kv] (packed training blocks).
        cache: cache of earlier context keys/values; context and block entries are appended (the caller crops the
            block entries afterwards, as transformers' DFlash path does with `crop(-block_size)`). transformers
            before 5.2x passes it as `past_key_values`, which is accepted too.
        """
        if cache is None:
            cache = kwargs.get("past_key_values")
        hidden = self.backbone(noise_embeds, context_hidden_states, position_ids, attention_mask, cache)
        draft_hidden = hidden[:, self.first_drafting_slot :]
        return DSparkDraftOutput(
            last_hidden_state=torch.cat([hidden[:, :1], draft_hidden], dim=1),
            draft_hidden_states=draft_hidden,
            cache=cache,
        )

    @property
    def first_drafting_slot(self) -> int:
        """0 when every slot predicts (DSpark, anchor included), 1 when slots 1.. predict (DFlash)."""
        return 0 if self.config.sample_from_anchor else 1

    def backbone(
        self,
        noise_embeds: torch.Tensor,
        context_hidden_states: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states [B, S, H] of every block slot (arguments as in `forward`).

        S may hold several packed blocks when a 4-D mask keeps them apart (training, offline evaluation).
        """
        batch, slots, _ = noise_embeds.shape
        context = self.project_context(context_hidden_states, batch)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + context.shape[1] + slots, device=noise_embeds.device)[None]
            position_ids = position_ids.expand(batch, -1)
        if position_ids.shape[1] != context.shape[1] + slots:
            raise ValueError(
                f"dspark: position_ids cover {position_ids.shape[1]} positions, expected context {context.shape[1]} "
                f"+ block {slots}."
            )
        cos, sin = self.rotary_emb(position_ids, noise_embeds.dtype)
        key_mask = self._key_mask(attention_mask, slots)
        hidden = noise_embeds.to(self.norm.weight.dtype)
        for layer in self.layers:
            hidden = layer(hidden, context, cos, sin, key_mask, cache)
        return self.norm(hidden)

    @staticmethod
    def _key_mask(attention_mask: torch.Tensor | None, slots: int) -> torch.Tensor | None:
        if attention_mask is None or is_block_mask(attention_mask):
            return attention_mask
        if attention_mask.dim() == 4:
            return attention_mask.bool()
        if attention_mask.dim() == 2:
            if bool(attention_mask.all()):
                return None
            return attention_mask.bool()[:, None, None, :].expand(-1, 1, slots, -1)
        raise ValueError(
            f"dspark: attention_mask must be 2-D [B, kv] or 4-D [B, 1, S, kv], got {attention_mask.dim()}-D."
        )

    def embed_block(self, anchor_ids: torch.Tensor) -> torch.Tensor:
        """[B] anchor ids -> [B, block_size, H] embeddings of `[anchor, MASK x (block_size - 1)]`."""
        block = anchor_ids.new_full((anchor_ids.shape[0], self.config.block_size), self.config.mask_token_id)
        block[:, 0] = anchor_ids
        return self.input_embeddings()(block)

    # -- heads and the Markov sampling step -------------------------------------------------------------------------

    def block_logits(self, draft_hidden: torch.Tensor) -> torch.Tensor:
        """Base logits U [B, N, V] (float32) of the drafting slots, before the Markov correction."""
        head = self.output_head()
        return head(draft_hidden.to(head.weight.dtype)).float()

    def slot_logits(
        self, base_logits: torch.Tensor, previous_tokens: torch.Tensor, hidden: torch.Tensor
    ) -> torch.Tensor:
        """Markov-corrected logits [..., V] (float32): U + W2(W1[x_prev]) (just U without a Markov head).

        base_logits: [..., V] from `block_logits`; previous_tokens: [...] the token before the slot's; hidden: [..., H].
        """
        if self.markov_head is None:
            return base_logits
        return base_logits + self.markov_head(previous_tokens, hidden).float()

    def slot_confidence_logit(self, previous_tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Confidence-head logit [...] (float32) that the slot's token is accepted given all earlier ones were."""
        embedding = self.markov_head.markov_w1(previous_tokens) if self.confidence_head.with_markov else None
        return self.confidence_head(hidden, embedding)

    def slot_confidence(self, previous_tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Probability [...] that the slot's token is accepted given all earlier ones were (sigmoid of the head)."""
        return torch.sigmoid(self.slot_confidence_logit(previous_tokens, hidden))

    def draft_block(
        self,
        draft_hidden: torch.Tensor,
        anchor_ids: torch.Tensor,
        choose_token: TokenChooser,
        max_tokens: int | None = None,
        confidence_threshold: float | None = None,
    ) -> DraftBlock:
        """The Markov sampling step, left to right: x_k ~ q_k = process(U_k + bias(x_{k-1})), x_{-1} = anchor.

        draft_hidden: [B, N, H]; anchor_ids: [B]. `choose_token` applies processors and picks the token, returning
        the logits it actually drew from; those are reported as q so verification stays lossless. With a confidence
        head and a threshold > 0, a row stops proposing at the first slot whose confidence (per position, or the
        survival product, per `config.confidence_stop`) falls below the threshold; every row proposes >= 1 token.
        """
        count = draft_hidden.shape[1] if max_tokens is None else min(max_tokens, draft_hidden.shape[1])
        threshold = self.config.confidence_threshold if confidence_threshold is None else confidence_threshold
        use_confidence = self.confidence_head is not None
        stops = use_confidence and threshold > 0
        base_logits = self.block_logits(draft_hidden[:, :count])
        batch = draft_hidden.shape[0]
        previous = anchor_ids
        lengths = torch.full((batch,), count, dtype=torch.long, device=draft_hidden.device)
        tokens, q_logits, confidences = [], [], []
        for slot in range(count):
            hidden = draft_hidden[:, slot]
            if use_confidence:
                confidences.append(self.slot_confidence(previous, hidden))
                if stops:
                    rule = self.config.confidence_stop
                    lengths = confidence_stop_lengths(torch.stack(confidences, dim=1), threshold, rule)
                    if bool((lengths <= slot).all()):
                        break  # every row stopped before this slot: drafting it would be wasted
            processed, previous = choose_token(self.slot_logits(base_logits[:, slot], previous, hidden))
            tokens.append(previous)
            q_logits.append(processed)
        return DraftBlock(
            tokens=torch.stack(tokens, dim=1),
            q_logits=torch.stack(q_logits, dim=1),
            confidence=torch.stack(confidences[: len(tokens)], dim=1) if confidences else None,
            lengths=lengths.clamp(max=len(tokens)),
        )

    def speculative_generate(self, target: PreTrainedModel, input_ids: torch.Tensor, **kwargs):
        """The `dspark` package's own loop (batches with left padding, per-row acceptance); see
        `dspark.speculative.speculative_generate` for the arguments. Needs `pip install dspark`."""
        try:
            # importlib rather than an import statement: transformers' remote-code loader requires every imported
            # package to be installed, and this file must load without `dspark`.
            loop = importlib.import_module("dspark.speculative")
        except ImportError as error:
            raise ImportError(
                "dspark: the batched speculative loop lives in the `dspark` package; install it to use "
                "draft.speculative_generate (target.generate(..., assistant_model=draft) works without it)."
            ) from error
        return loop.speculative_generate(target, self, input_ids, **kwargs)

    # -- drafting inside transformers' assisted generation -----------------------------------------------------------

    def _reset_drafting_state(self) -> None:
        self._draft_cache: DynamicCache | None = None
        self._cached_ids: torch.Tensor | None = None  # [1, d]: tokens whose context is in the draft cache
        self._captured: CapturedFeatures | None = None

    def _store_capture(self, captured: CapturedFeatures) -> None:
        self._captured = captured

    def _arm_tap(self, target: PreTrainedModel) -> None:
        if self._tap is None or self._tap.target is not target:
            self._tap = TargetFeatureTap(target, self.config.target_layer_ids, self._store_capture)
        self._tap.arm()

    def recompute_target_features(self, target: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the target's decoder on `input_ids` [B, T] and return its features [B, T, K * H_t]."""
        outputs = target.get_decoder()(input_ids=input_ids, output_hidden_states=True, use_cache=False)
        return extract_target_features(outputs.hidden_states, self.config.target_layer_ids)

    def _new_context(self, target: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Target features for positions [d, L - 1) not yet in the draft cache; None on the first round."""
        cached = 0 if self._cached_ids is None else self._cached_ids.shape[1]
        needed = input_ids.shape[1] - 1
        # A new sequence (or the same prompt again, where the cache runs past the new context): start afresh.
        if cached and (cached > needed or not torch.equal(input_ids[:, :cached], self._cached_ids)):
            self._reset_drafting_state()
            cached = 0
        features = self._captured.take(cached, needed, input_ids) if self._captured is not None else None
        self._captured = None
        if features is not None:
            return features
        if self._draft_cache is None:
            return None  # first round: the target has not run yet; its prefill will be captured
        if cached == needed:
            return self.fc.weight.new_zeros(1, 0, self.fc.in_features)
        # The capture does not line up (target fed embeddings, or a round without drafting): rebuild from scratch.
        self._reset_drafting_state()
        return self.recompute_target_features(target, input_ids[:, :needed])

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        generation_config=None,
        logits_processor: LogitsProcessorList | list | None = None,
        max_new_tokens: int | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> GenerateDecoderOnlyOutput:
        """Propose candidates for `target.generate(..., assistant_model=draft)` (called by transformers).

        Returns `sequences` = input_ids + drafted tokens and `scores` = the processed logits each token was drawn
        from (the q of speculative sampling). A draft is not a language model of its own: calling this directly
        raises an error pointing to the supported entry points.
        """
        if generation_config is None or not getattr(generation_config, "is_assistant", False):
            raise ValueError(
                "dspark: a draft model does not generate on its own. Use "
                "`target.generate(input_ids, assistant_model=draft)` (after `draft.bind_target(target)`) or "
                "`dspark.speculative_generate(target, draft, input_ids)`."
            )
        target = self._require_target("draft candidates")
        if input_ids.shape[0] != 1:
            raise ValueError(
                f"dspark: transformers' assisted generation supports batch size 1, got {input_ids.shape[0]}. "
                "For batches use dspark.speculative_generate(target, draft, input_ids, attention_mask=...)."
            )
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "dspark: padded inputs are not supported through transformers' assisted generation; "
                "use dspark.speculative_generate(target, draft, input_ids, attention_mask=...)."
            )
        budget = (
            self.config.num_draft_tokens
            if max_new_tokens is None
            else min(max_new_tokens, self.config.num_draft_tokens)
        )
        processors = LogitsProcessorList(logits_processor or [])
        context = self._new_context(target, input_ids)
        if context is None:
            tokens, scores = self._placeholder_candidate(input_ids)
        else:
            tokens, scores = self._draft_candidates(input_ids, context, processors, generation_config, budget)
        self._arm_tap(target)
        return GenerateDecoderOnlyOutput(
            sequences=torch.cat([input_ids, tokens.to(input_ids.device)], dim=-1),
            scores=tuple(scores[:, j] for j in range(scores.shape[1])),
        )

    def _placeholder_candidate(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """First round, before the target's prefill: one candidate with a one-hot q.

        With q one-hot, greedy verification and speculative sampling both stay exact (p(x)/q(x) = p(x), and the
        residual max(p - q, 0) is p without x), so the prefill doubles as the first verification.
        """
        token = input_ids[:, -1:]
        scores = torch.full((1, 1, self.config.vocab_size), float("-inf"), device=input_ids.device)
        scores[0, 0, token[0, 0]] = 0.0
        return token, scores

    def _draft_candidates(self, input_ids, context, processors, generation_config, budget):
        if self._draft_cache is None:
            self._draft_cache = DynamicCache()
        cached = self._draft_cache.get_seq_length()
        block = self.embed_block(input_ids[:, -1])
        end = cached + (0 if context is None else context.shape[1]) + self.config.block_size
        positions = torch.arange(cached, end, device=block.device)[None]
        output = self(block, context, position_ids=positions, cache=self._draft_cache)
        self._draft_cache.crop(-self.config.block_size)  # keep only context entries: positions [0, L - 1)
        self._cached_ids = input_ids[:, :-1].clone()
        chooser = ProcessorTokenChooser(input_ids, processors, bool(generation_config.do_sample))
        drafted = self.draft_block(output.draft_hidden_states, input_ids[:, -1], chooser, max_tokens=budget)
        length = int(drafted.lengths[0])
        # Candidates end at their first stop token, as transformers' own assistants' do: its assisted loop (5.17)
        # checks stop tokens on the last token of a round only, so a stop token accepted mid-block would be run past.
        stop_ids = getattr(generation_config, "eos_token_id", None)
        if stop_ids is not None:
            stop_ids = torch.tensor(stop_ids, device=drafted.tokens.device).flatten()
            stops = torch.isin(drafted.tokens[0, :length], stop_ids).nonzero()
            if stops.numel() > 0:
                length = int(stops[0, 0]) + 1
        return drafted.tokens[:, :length], drafted.q_logits[:, :length]


def spread_layer_ids(num_target_layers: int, count: int) -> list[int]:
    """`count` layer ids spread evenly over a target's depth, avoiding the first and the last three when possible."""
    count = max(1, min(count, num_target_layers))
    low, high = (1, num_target_layers - 3) if num_target_layers > count + 3 else (0, num_target_layers - 1)
    if count == 1:
        return [(low + high) // 2]
    return sorted({round(low + i * (high - low) / (count - 1)) for i in range(count)})


DSparkDraftModel.register_for_auto_class("AutoModel")
DSparkConfig.register_for_auto_class()

__all__ = [
    "CapturedFeatures",
    "DSparkDraftModel",
    "DSparkDraftOutput",
    "DSparkPreTrainedModel",
    "DraftBlock",
    "ProcessorTokenChooser",
    "TargetFeatureTap",
    "extract_target_features",
    "spread_layer_ids",
    "target_is_stateful",
]
