"""The static-shape speculative loop: batch 1, standard-attention targets, optionally replayed from CUDA graphs.

Every round after the first has identical shapes: the draft step reads the last verify block's features (Q = N + 1
entries, the rejected ones masked) and drafts N tokens; the verify step runs the target over [anchor, N drafted] (Q
tokens, always all N even when the confidence head stops a block early: the unused slots come after the proposed ones,
so the causal mask already keeps them out of the proposed slots' logits, and verification ignores them). Both caches
are preallocated (a transformers `StaticCache` for the target, `StaticDraftCache` for the draft), their write
positions and the masks are computed on the device from one counter, and a rejected token's entries are simply
overwritten next round, because with one row the cache index of a token equals its position.

On CUDA the two steps are captured as CUDA graphs on first use and replayed; the accept step (verification, a few
small kernels) runs eagerly, followed by the round's only host sync: one `.tolist()` of the verdict and the block.

Shapes: P prompt length, N = draft.config.num_draft_tokens drafted tokens per round, Q = N + 1 verified positions,
S = draft block size, F = K * H_target feature width, V vocabulary, L / Ld target / draft cache lengths.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList
from transformers.cache_utils import StaticCache

from .acceptance import AcceptanceStats
from .cuda_graphs import GraphedStep
from .modeling_dspark import (
    DSparkDraftModel,
    ProcessorTokenChooser,
    cache_keyword,
    extract_target_features,
    target_is_stateful,
)
from .static_cache import (
    StaticDraftCache,
    additive_mask,
    bucket_length,
    causal_key_mask,
    set_static_cache_position,
)
from .verify import Verdict, accept_prefix, verify

SUPPORTED_ATTENTION = ("sdpa", "eager")


def check_static_support(target, input_ids: torch.Tensor) -> None:
    """Refuse, with the reason and the way out, what the static path cannot run exactly."""
    if target_is_stateful(target):
        raise ValueError(
            "dspark: static_cache=True supports attention-only targets; this target has recurrent (linear-attention) "
            "state, which needs the rewind-and-replay path. Use static_cache=False."
        )
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"dspark: static_cache=True runs batch 1 only (got {input_ids.shape[0]} rows): rows accept different "
            "amounts, and a shared StaticCache write position cannot follow them. Use static_cache=False for batches, "
            "or call once per row."
        )
    config = target.config.get_text_config()
    layer_types = getattr(config, "layer_types", None) or []
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    if sliding or any(kind != "full_attention" for kind in layer_types):
        raise ValueError(
            "dspark: static_cache=True builds one full causal mask for every layer; sliding-window or chunked "
            "attention layers are not supported yet. Use static_cache=False."
        )
    implementation = target.config._attn_implementation
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"dspark: static_cache=True needs a 4-D attention mask, which attn_implementation={implementation!r} does "
            f"not take; load the target with attn_implementation in {SUPPORTED_ATTENTION}, or use static_cache=False."
        )


def confidence_lengths(confidence: torch.Tensor | None, count: int, config) -> torch.Tensor | None:
    """[B, N] per-slot confidence -> [B] tokens each row proposes, without a host sync.

    The same rule as `DSparkDraftModel.draft_block` (stop at the first slot k > 0 whose score is below the
    threshold), which breaks out of its loop once all rows stopped and so cannot be captured; here the whole block is
    drafted and the stop is applied afterwards. Returns None when no confidence stop applies (all N proposed).
    """
    threshold = config.confidence_threshold
    if confidence is None or threshold <= 0:
        return None
    score = confidence if config.confidence_stop == "position" else confidence.cumprod(dim=-1)
    keep = score >= threshold
    keep[:, 0] = True  # every row proposes at least one token
    return accept_prefix(keep[:, :count])


@dataclass
class StaticBuffers:
    """Everything the captured steps read and write, at fixed addresses ([1, ...] rows)."""

    length: torch.Tensor  # [] tokens in the target cache = the anchor's position
    kept: torch.Tensor  # [] entries of `context` that are part of the sequence (accepted + 1; P after the prefill)
    anchor: torch.Tensor  # [1] last emitted token, not yet seen by the target
    context: torch.Tensor  # [1, Q, F] features of the last verify block
    block_tokens: torch.Tensor  # [1, N] drafted tokens
    q_logits: torch.Tensor  # [1, N, V] float32, what the draft sampled from
    proposed: torch.Tensor  # [1] drafted tokens the row proposes (confidence stop)
    target_mask: torch.Tensor  # [1, 1, Q, L] visible target cache entries of each verified position
    logits: torch.Tensor  # [1, Q, V] target logits of the verify block
    features: torch.Tensor  # [1, Q, F] target features of the verify block


class StaticSpeculativeRunner:
    """Caches, buffers and (on CUDA) captured graphs for one (target, draft, cache length, sampling setting).

    Kept between calls (see `runner_for`) so a graph is captured once per setting, not once per prompt.
    """

    def __init__(
        self,
        target,
        draft: DSparkDraftModel,
        max_len: int,
        processors: LogitsProcessorList,
        do_sample: bool,
        use_graphs: bool,
        key: tuple = (),
        draft_tokens: int | None = None,
    ):
        self.key = key  # what `runner_for` compares to decide whether a later call can reuse this runner
        self.target, self.draft = target, draft
        self.processors, self.do_sample = processors, do_sample
        self.max_len = max_len
        self.slots = draft.config.block_size
        # Verify only the first `draft_tokens` drafted tokens (0: no draft at all, plain decoding on this path).
        full = draft.config.num_draft_tokens
        self.count = full if draft_tokens is None else max(0, min(draft_tokens, full))
        self.queries = self.count + 1
        self.keyword = cache_keyword(target)
        device, vocab = target.device, target.config.get_text_config().vocab_size
        width = len(draft.config.target_layer_ids) * draft.config.target_hidden_size
        mask_dtype = torch.bool if target.config._attn_implementation == "sdpa" else target.dtype
        self.target_cache = StaticCache(config=target.config, max_cache_len=max_len)
        # The draft cache also holds a whole verify block of context and the drafted block beyond the sequence.
        draft_len = bucket_length(max_len + self.queries + self.slots, 16)
        self.draft_cache = StaticDraftCache(draft.config, draft_len, draft.dtype, device)
        self.buffers = StaticBuffers(
            length=torch.zeros((), dtype=torch.long, device=device),
            kept=torch.zeros((), dtype=torch.long, device=device),
            anchor=torch.zeros(1, dtype=torch.long, device=device),
            context=torch.zeros(1, self.queries, width, dtype=target.dtype, device=device),
            block_tokens=torch.zeros(1, self.count, dtype=torch.long, device=device),
            q_logits=torch.zeros(1, self.count, vocab, dtype=torch.float32, device=device),
            proposed=torch.full((1,), self.count, dtype=torch.long, device=device),
            target_mask=torch.zeros(1, 1, self.queries, max_len, dtype=mask_dtype, device=device),
            logits=torch.zeros(1, self.queries, vocab, dtype=torch.float32, device=device),
            features=torch.zeros(1, self.queries, width, dtype=target.dtype, device=device),
        )
        # plain decoding (count 0) drafts nothing: a graph of it would be empty, which CUDA warns about
        self.draft_step = GraphedStep(
            lambda: self.draft_into_buffers(self.buffers.context), use_graphs and self.count > 0, name="draft step"
        )
        self.verify_step = GraphedStep(self.verify_into_buffers, use_graphs, name="verify step")

    # -- prefill (eager: its shape is the prompt's) ------------------------------------------------------------------

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt [1, P] into the target cache; returns its features [1, P, F] and sets the anchor."""
        length = input_ids.shape[1]
        set_static_cache_position(self.target_cache, 0)
        visible = causal_key_mask(0, length, self.max_len, input_ids.device)
        out = self.target(
            input_ids=input_ids,
            attention_mask=self.format_mask(visible),
            position_ids=torch.arange(length, device=input_ids.device)[None],
            **{self.keyword: self.target_cache},
            use_cache=True,
            output_hidden_states=True,
            logits_to_keep=1,
        )
        self.buffers.anchor.copy_(self.choose(out.logits[:, -1].float()))
        self.buffers.length.fill_(length)
        self.buffers.kept.fill_(length)
        return extract_target_features(out.hidden_states, self.draft.config.target_layer_ids)

    def format_mask(self, visible: torch.Tensor) -> torch.Tensor:
        return visible if self.buffers.target_mask.dtype == torch.bool else additive_mask(visible, self.target.dtype)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """[1, V] target logits -> [1] token (argmax or a draw from the processed distribution)."""
        chooser = ProcessorTokenChooser(logits.new_zeros(1, 0, dtype=torch.long), self.processors, self.do_sample)
        return chooser(logits)[1]

    # -- the two steps that are captured -----------------------------------------------------------------------------

    def draft_into_buffers(self, context: torch.Tensor) -> None:
        """Draft step: backbone over [context ; block], Markov sampling of the block, outputs into the buffers.

        context: [1, C, F] (C = P in the first round, Q after). Its first `kept` entries continue the sequence; they
        are written from cache index length - kept on (so the rejected entries of last round's block are overwritten)
        and the block after all C of them; the mask shows the sequence and the block only.
        """
        if self.count == 0:
            return  # plain decoding: nothing to draft
        b, draft, cache = self.buffers, self.draft, self.draft_cache
        device, fresh = context.device, context.shape[1]
        base = b.length - b.kept
        cache.position.copy_(base)
        block_positions = b.length + torch.arange(self.slots, device=device)
        positions = torch.cat([base + torch.arange(fresh, device=device), block_positions])[None]
        keys = torch.arange(cache.max_len, device=device)
        block_start = base + fresh
        visible = (keys < b.length) | ((keys >= block_start) & (keys < block_start + self.slots))
        mask = visible.expand(1, 1, self.slots, cache.max_len).contiguous()  # SDPA kernels want a dense mask
        out = draft(draft.embed_block(b.anchor), context, position_ids=positions, attention_mask=mask, cache=cache)
        chooser = ProcessorTokenChooser(b.anchor[:, None], self.processors, self.do_sample)
        # threshold 0: draft every slot (no data-dependent break); the confidence stop is applied just below.
        block = draft.draft_block(
            out.draft_hidden_states, b.anchor, chooser, max_tokens=self.count, confidence_threshold=0.0
        )
        b.block_tokens.copy_(block.tokens)
        b.q_logits.copy_(block.q_logits)
        lengths = confidence_lengths(block.confidence, self.count, draft.config)
        if lengths is None:
            b.proposed.fill_(self.count)
        else:
            b.proposed.copy_(lengths)

    def verify_into_buffers(self) -> None:
        """Verify step: the target over [anchor, N drafted] at positions length .. length + N, written into the
        target cache from index `length` on; logits and features into the buffers."""
        b = self.buffers
        device = b.anchor.device
        set_static_cache_position(self.target_cache, b.length)
        b.target_mask.copy_(self.format_mask(causal_key_mask(b.length, self.queries, self.max_len, device)))
        out = self.target(
            input_ids=torch.cat([b.anchor[:, None], b.block_tokens], dim=1),
            attention_mask=b.target_mask,
            position_ids=(b.length + torch.arange(self.queries, device=device))[None],
            **{self.keyword: self.target_cache},
            use_cache=True,
            output_hidden_states=self.count > 0,  # plain decoding feeds no draft
        )
        b.logits.copy_(out.logits)
        if self.count > 0:
            b.features.copy_(extract_target_features(out.hidden_states, self.draft.config.target_layer_ids))

    # -- accept (eager, small) ---------------------------------------------------------------------------------------

    def processed(self, logits: torch.Tensor) -> torch.Tensor:
        """[1, Q, V] -> the same through the warpers (position-independent, so one call over all positions)."""
        if not self.processors:
            return logits
        flat = logits.reshape(-1, logits.shape[-1])
        return self.processors(flat.new_zeros(flat.shape[0], 0, dtype=torch.long), flat).view_as(logits)

    def accept(self, generator: torch.Generator | None) -> list[int]:
        """Verify the block, advance the device state, and read back [accepted, next token, proposed, *drafted]."""
        b = self.buffers
        if self.count == 0:
            verdict = Verdict(b.proposed.new_zeros(1), self.choose(b.logits[:, 0]))
        else:
            target_logits = self.processed(b.logits)
            verdict = verify(b.block_tokens, b.proposed, b.q_logits, target_logits, self.do_sample, generator)
        b.kept.copy_(verdict.accepted[0] + 1)
        b.length.add_(b.kept)
        b.anchor.copy_(verdict.next_tokens)
        b.context.copy_(b.features)
        # The round's one host sync.
        return torch.cat([verdict.accepted, verdict.next_tokens, b.proposed, b.block_tokens[0]]).tolist()


# draft -> {setting key: runner}. Weak on the draft, so dropping the models frees caches and graphs.
_RUNNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def runner_for(
    target,
    draft,
    needed: int,
    processors,
    do_sample: bool,
    use_graphs: bool,
    sampling_key: tuple,
    draft_tokens: int | None = None,
) -> StaticSpeculativeRunner:
    """The runner for this setting (target, sampling, graphs, draft tokens) if its caches hold `needed` tokens, else a
    new one in its place (a longer one: graphs are captured once per setting and cache length)."""
    runners = _RUNNERS.setdefault(draft, {})
    key = (id(target), sampling_key, use_graphs, draft_tokens, target.dtype, str(target.device))
    runner = runners.get(key)
    if runner is None or runner.max_len < needed:
        runners.pop(key, None)  # free the old graphs and caches before allocating new ones
        max_len = bucket_length(needed)
        runner = StaticSpeculativeRunner(target, draft, max_len, processors, do_sample, use_graphs, key, draft_tokens)
        runners[key] = runner
    return runner


@torch.no_grad()
def generate_static(
    target,
    draft: DSparkDraftModel,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    do_sample: bool,
    processors: LogitsProcessorList,
    stop_ids: set[int],
    generator: torch.Generator | None,
    use_graphs: bool,
    sampling_key: tuple,
    on_event=None,
    draft_tokens: int | None = None,
) -> tuple[list[int], AcceptanceStats, dict[str, float]]:
    """One row [1, P] through the static loop; returns (generated tokens, acceptance stats, seconds per phase).

    `on_event(accepted, rejected, next_token, emitted, first)` is called per round (and for the prefill's token).
    `draft_tokens` verifies fewer than the draft's N tokens per round; 0 is plain decoding (one target forward per
    token, no draft), the baseline of the graph path itself.
    """
    needed = input_ids.shape[1] + max_new_tokens + draft.config.num_draft_tokens + 1
    runner = runner_for(target, draft, needed, processors, do_sample, use_graphs, sampling_key, draft_tokens)
    acceptance = AcceptanceStats(num_slots=runner.count)
    seconds = {"prefill": 0.0, "draft": 0.0, "verify": 0.0, "commit": 0.0}

    started = time.perf_counter()
    prompt_features = runner.prefill(input_ids)
    first = int(runner.buffers.anchor[0])
    generated = [first]
    finished = first in stop_ids or max_new_tokens <= 1
    seconds["prefill"] = time.perf_counter() - started
    if on_event is not None:
        on_event([], [], first, [first], True)
    first_round = True
    while not finished:
        tick = time.perf_counter()
        if first_round:
            runner.draft_into_buffers(prompt_features)  # the prompt's context has its own shape: eager
            first_round = False
        else:
            runner.draft_step()
        tock = time.perf_counter()
        seconds["draft"] += tock - tick
        runner.verify_step()
        values = runner.accept(generator)
        tick = time.perf_counter()
        seconds["verify"] += tick - tock
        accepted, next_token, proposed, drafted = values[0], values[1], values[2], values[3:]
        emitted = []
        for token in [*drafted[:accepted], next_token]:
            emitted.append(token)
            generated.append(token)
            if token in stop_ids or len(generated) >= max_new_tokens:
                finished = True
                break
        acceptance.record(torch.tensor([accepted]), torch.tensor([proposed]), torch.tensor([True]), [len(emitted)])
        seconds["commit"] += time.perf_counter() - tick
        if on_event is not None:
            on_event(drafted[:accepted], drafted[accepted:proposed], next_token, emitted, False)
    seconds["total"] = time.perf_counter() - started
    return generated, acceptance, seconds
