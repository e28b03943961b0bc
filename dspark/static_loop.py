"""The static-shape speculative loop: attention-only and hybrid (Qwen3.5-style Gated DeltaNet) targets, batches of
any size, optionally replayed from CUDA graphs.

Every round after the first has identical shapes: the draft step reads the last verify block's features (Q = N + 1
entries per row, the rejected ones masked) and drafts N tokens per row; the verify step runs the target over
[anchor, N drafted] (Q tokens, always all N even when the confidence head stops a block early: the unused slots come
after the proposed ones, so the causal mask already keeps them out of the proposed slots' logits, and verification
ignores them). Both caches are preallocated (a transformers `StaticCache` for the target, `StaticDraftCache` for the
draft). Each row writes at its own cache index (`write_rows`), so a row's cache stays compact however much the other
rows accepted: a rejected token's entries are simply overwritten next round, and a row's cache index is its position
plus its left padding. Write indices and masks are computed on the device from per-row counters.

On CUDA the two steps are captured as CUDA graphs on first use and replayed; the accept step (verification, a few
small kernels) runs eagerly, followed by the round's only host sync: one `.tolist()` of the verdicts and blocks.
A finished row keeps running (shapes are fixed) but stands still: it keeps nothing, so its counters stop moving.

With `skinny_kernels=True` the verify step's projections run through `dspark.skinny_linear`'s Triton kernels
(installed on the target's modules for the step only; q/k/v and gate-up as one launch each) instead of cuBLAS, and
its attention through `dspark.verify_attention`'s kernel (in place of transformers' SDPA function for the step).

Hybrid targets: the attention layers work as above; each Gated DeltaNet layer keeps what the verify block computed
(its keys, corrected values and decays, and its conv inputs) and the next verify step first moves every row to its
state after its kept tokens (`dspark.gated_deltanet_states`), so a round needs no replay forward and keeps its fixed
shapes. Their prefill runs transformers' own forward (its chunked linear-attention kernels) and moves the caches
into the fixed buffers.

Shapes: B rows, P prompt length (left-padded), N = draft.config.num_draft_tokens drafted tokens per round,
Q = N + 1 verified positions, S = draft block size, F = K * H_target feature width, V vocabulary, L / Ld target /
draft cache lengths.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
from accelerate.utils import compile_regions
from transformers import DynamicCache, LogitsProcessorList

from .acceptance import AcceptanceStats
from .cuda_graphs import GraphedStep
from .gated_deltanet_states import GatedDeltaNetStates, gated_deltanet_modules, linear_attention_layer_ids
from .modeling_dspark import (
    DSparkDraftModel,
    ProcessorTokenChooser,
    cache_keyword,
    confidence_stop_lengths,
    extract_target_features,
    target_is_stateful,
)
from .skinny_linear import SkinnyProjections
from .speculative import (
    PhaseClock,
    RoundCallback,
    RoundEvent,
    append_until_stop,
    choose_tokens,
    warp_block_logits,
)
from .static_cache import (
    StaticDraftCache,
    additive_mask,
    bucket_length,
    causal_key_mask,
    row_static_cache,
)
from .verify import Verdict, verify
from .verify_attention import routed_sdpa

SUPPORTED_ATTENTION = ("sdpa", "eager")


def check_static_support(target) -> None:
    """Refuse, with the reason and the way out, what the static path cannot run exactly."""
    placement = sorted({str(device) for device in (getattr(target, "hf_device_map", None) or {}).values()})
    if len(placement) > 1 or {"disk", "meta"} & set(placement):
        raise ValueError(
            f"dspark: static_cache=True needs the whole target on one device; its device_map spreads it over "
            f"{placement} (its caches, buffers and graphs live on one device, and offloaded weights are loaded layer "
            "by layer during the forward). Load the target on one GPU, or use static_cache=False."
        )
    config = target.config.get_text_config()
    kinds = set(getattr(config, "layer_types", None) or [])
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    if sliding or kinds - {"full_attention", "linear_attention"}:
        raise ValueError(
            "dspark: static_cache=True builds one full causal mask for every attention layer; sliding-window, "
            f"chunked or other layers ({sorted(kinds - {'full_attention', 'linear_attention'})}) are not supported "
            "yet. Use static_cache=False."
        )
    if "linear_attention" in kinds:
        gated_deltanet_modules(target)  # raises, naming what it lacks, for linear attention of another kind
    elif target_is_stateful(target):
        raise ValueError(
            "dspark: static_cache=True rolls back Qwen3.5-style Gated DeltaNet state only; this target has recurrent "
            "state of another kind. Use static_cache=False (the dynamic loop snapshots and replays it)."
        )
    implementation = target.config._attn_implementation
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"dspark: static_cache=True needs a 4-D attention mask, which attn_implementation={implementation!r} does "
            f"not take; load the target with attn_implementation in {SUPPORTED_ATTENTION}, or use static_cache=False."
        )


@dataclass
class StaticBuffers:
    """Everything the captured steps read and write, at fixed addresses (one entry per row)."""

    padding: torch.Tensor  # [B] left padding of the prompt (cache entries no real token sees)
    length: torch.Tensor  # [B] entries in the row's target cache = the anchor's cache index
    kept: torch.Tensor  # [B] entries of `context` that continue the row (accepted + 1; P after the prefill)
    active: torch.Tensor  # [B] bool, False once the row finished (it then keeps nothing)
    anchor: torch.Tensor  # [B] last emitted token, not yet seen by the target
    context: torch.Tensor  # [B, Q, F] features of the last verify block
    block_tokens: torch.Tensor  # [B, N] drafted tokens
    q_logits: torch.Tensor  # [B, N, V] float32, what the draft sampled from
    proposed: torch.Tensor  # [B] drafted tokens the row proposes (confidence stop)
    target_write: torch.Tensor  # [B] where the target cache writes next (read by every layer)
    target_mask: torch.Tensor  # [B, 1, Q, L] visible target cache entries of each verified position
    logits: torch.Tensor  # [B, Q, V] target logits of the verify block
    features: torch.Tensor  # [B, Q, F] target features of the verify block


@contextlib.contextmanager
def recompile_limit(limit: int):
    """Let dynamo compile one code object up to `limit` times (for shapes) before it falls back to eager code, and the
    whole process 16 times that (each runner adds one compilation per decoder layer: transformers' layers index the
    cache by their layer number, which dynamo treats as a constant)."""
    config = torch._dynamo.config
    renamed = hasattr(config, "recompile_limit")  # torch 2.6 renamed cache_size_limit
    limits = {
        "recompile_limit" if renamed else "cache_size_limit": limit,
        "accumulated_recompile_limit" if renamed else "accumulated_cache_size_limit": 16 * limit,
    }
    with config.patch({name: max(value, getattr(config, name)) for name, value in limits.items()}):
        yield


class StaticSpeculativeRunner:
    """Caches, buffers and (on CUDA) captured graphs for one (target, draft, batch, cache length, sampling setting).

    Kept between calls (see `runner_for`) so a graph is captured once per setting, not once per prompt.
    """

    def __init__(
        self,
        target,
        draft: DSparkDraftModel,
        batch: int,
        max_len: int,
        processors: LogitsProcessorList,
        do_sample: bool,
        use_graphs: bool,
        key: tuple = (),
        draft_tokens: int | None = None,
        compile_steps: bool = False,
        skinny_kernels: bool = False,
    ):
        self.key = key  # what `runner_for` compares to decide whether a later call can reuse this runner
        self.use_graphs, self.draft_tokens, self.compile_steps = use_graphs, draft_tokens, compile_steps
        self.skinny_kernels = skinny_kernels
        self.target, self.draft = target, draft
        self.processors, self.do_sample = processors, do_sample
        self.batch, self.max_len = batch, max_len
        self.slots = draft.config.block_size
        # Verify only the first `draft_tokens` drafted tokens (0: no draft at all, plain decoding on this path).
        full = draft.config.num_draft_tokens
        self.count = full if draft_tokens is None else max(0, min(draft_tokens, full))
        self.queries = self.count + 1
        self.keyword = cache_keyword(target)
        device, vocab = target.device, target.config.get_text_config().vocab_size
        width = len(draft.config.target_layer_ids) * draft.config.target_hidden_size
        mask_dtype = torch.bool if target.config._attn_implementation == "sdpa" else target.dtype

        def rows(*shape, dtype=target.dtype, fill=0):
            return torch.full((batch, *shape), fill, dtype=dtype, device=device)

        self.buffers = StaticBuffers(
            padding=rows(dtype=torch.long),
            length=rows(dtype=torch.long),
            kept=rows(dtype=torch.long),
            active=rows(dtype=torch.bool, fill=True),
            anchor=rows(dtype=torch.long),
            context=rows(self.queries, width),
            block_tokens=rows(self.count, dtype=torch.long),
            q_logits=rows(self.count, vocab, dtype=torch.float32),
            proposed=rows(dtype=torch.long, fill=self.count),
            target_write=rows(dtype=torch.long),
            target_mask=rows(1, self.queries, max_len, dtype=mask_dtype),
            logits=rows(self.queries, vocab, dtype=torch.float32),
            features=rows(self.queries, width),
        )
        # Hybrid targets: the Gated DeltaNet layers' fixed states, in the target cache at their layers' places.
        hybrid = bool(linear_attention_layer_ids(target))
        self.linear_states = GatedDeltaNetStates(target, batch, self.queries) if hybrid else None
        # The verify block's projections through weight-streaming kernels (`dspark.skinny_linear`).
        self.projections = SkinnyProjections(target) if skinny_kernels else None
        linear_layers = self.linear_states.layers if self.linear_states else None
        self.target_cache = row_static_cache(target.config, max_len, self.buffers.target_write, linear_layers)
        # The draft cache also holds a whole verify block of context and the drafted block beyond the sequence.
        draft_len = bucket_length(max_len + self.queries + self.slots, 16)
        self.draft_cache = StaticDraftCache(draft.config, draft_len, draft.dtype, device, batch)
        draft_fn = self.draft_into_buffers
        # The model the verify step runs. Compiling fuses the many small kernels of an eager forward (norms, rotary,
        # activations, residuals) that a graph replay would still run one by one. The target is compiled by regions
        # (each repeated decoder layer, and the modules around them): its layers share one compiled code, which
        # halves the compile time of compiling the whole verify step (a 36-layer target on a CPU, cold: 23 s
        # against ~55 s; on an H200 both steps of a Qwen3-8B shape compile in 45 s).
        self.verify_target = compile_regions(target, dynamic=False) if compile_steps else target
        if compile_steps and self.count > 0:
            # The draft is small: its whole step compiles, Markov sampling included. Plain decoding's draft step does
            # nothing: compiling it would give dynamo an empty frame of the same code, which makes it re-trace the
            # real draft steps of other runners on every call.
            draft_fn = torch.compile(draft_fn, dynamic=False)
        # plain decoding (count 0) drafts nothing: a graph of it would be empty, which CUDA warns about
        self.draft_step = GraphedStep(
            lambda: draft_fn(self.buffers.context), use_graphs and self.count > 0, name="draft step"
        )
        self.verify_step = GraphedStep(self.verify_into_buffers, use_graphs, name="verify step")

    @torch.no_grad()
    def prepare(self) -> None:
        """Compile and capture both steps now, on the zeroed buffers, rather than in whichever later round first
        needs them: a generation that stops after its first round never runs the draft step, and a warm-up made of
        such generations would leave the capture (or compilation) to a timed run.

        Harmless to the generations that follow: the prefill and the first round rewrite the counters and the cache
        entries a real round reads, and whatever this call wrote beyond them stays masked until it is overwritten;
        the random-number state is put back, so a seeded sampled run draws the same whether its runner is new or not.
        Runs without autograd whatever the caller's mode: code compiled with gradients on would compile again (and
        count against dynamo's recompile limit) when the generation runs without them.
        """
        if not (self.use_graphs or self.compile_steps):
            return  # eager steps: nothing to prepare
        device = self.buffers.anchor.device
        # Compiling happens here and only here (later calls hit dynamo's cache): every runner's shapes are new code
        # for the shared layer code, beyond dynamo's default of 8 compilations per code object.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), recompile_limit(256):
            if self.compile_steps:
                # One eager pass first, so lazy initialisations (the target cache's buffers, the draft's rotary
                # table) happen outside the compiled code: compiled against them uninitialised, it would compile
                # again. (A graph capture needs none: its warm-up calls run eagerly before recording.)
                if self.count > 0:
                    self.draft_into_buffers(self.buffers.context)
                self.verify_into_buffers(self.target)
            if self.count > 0:
                self.draft_step()
            self.verify_step()

    # -- prefill (eager: its shape is the prompt's) ------------------------------------------------------------------

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the prompts [B, P] (left-padded where attention_mask [B, P] is 0) into the target cache; returns their
        features [B, P, F] and sets the anchors."""
        b, length = self.buffers, input_ids.shape[1]
        b.padding.copy_(length - attention_mask.sum(-1))
        b.target_write.zero_()
        b.active.fill_(True)
        positions = (torch.arange(length, device=input_ids.device)[None] - b.padding[:, None]).clamp(min=0)
        if self.linear_states is None:
            visible = causal_key_mask(b.target_write, b.padding, length, self.max_len)
            cache, mask = self.target_cache, self.format_mask(visible)
        else:  # transformers' own prefill (chunked linear-attention kernels), moved into the fixed buffers below
            cache, mask = DynamicCache(config=self.target.config), attention_mask
        out = self.target(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            **{self.keyword: cache},
            use_cache=True,
            output_hidden_states=True,
            logits_to_keep=1,
        )
        if self.linear_states is not None:
            self.load_prefill(cache)
        b.anchor.copy_(choose_tokens(out.logits[:, -1], self.processors, self.do_sample))
        b.length.fill_(length)
        b.kept.fill_(length)
        return extract_target_features(out.hidden_states, self.draft.config.target_layer_ids)

    def load_prefill(self, cache: DynamicCache) -> None:
        """Hybrid targets: copy a prefill's transformers cache into the fixed ones (attention entries from index 0 on,
        where the static prefill would have written them; linear states into their layers' buffers)."""
        for index, layer in enumerate(cache.layers):
            if index not in self.linear_states.layers:  # a RowStaticLayer: writes each row from target_write (0)
                self.target_cache.layers[index].update(layer.keys, layer.values)
        self.linear_states.load_prefill(cache)

    def format_mask(self, visible: torch.Tensor) -> torch.Tensor:
        return visible if self.buffers.target_mask.dtype == torch.bool else additive_mask(visible, self.target.dtype)

    # -- the two steps that are captured -----------------------------------------------------------------------------

    def draft_into_buffers(self, context: torch.Tensor) -> None:
        """Draft step: backbone over [context ; block], Markov sampling of the block, outputs into the buffers.

        context: [B, C, F] (C = P in the first round, Q after). Its first `kept` entries continue each row; they are
        written from cache index length - kept on (so the rejected entries of last round's block are overwritten)
        and the block after all C of them; the mask shows the row's sequence (without its padding) and the block.
        """
        if self.count == 0:
            return  # plain decoding: nothing to draft
        b, draft, cache = self.buffers, self.draft, self.draft_cache
        device, fresh = context.device, context.shape[1]
        base = b.length - b.kept
        cache.position.copy_(base)
        context_positions = base[:, None] + torch.arange(fresh, device=device)
        block_positions = b.length[:, None] + torch.arange(self.slots, device=device)
        positions = (torch.cat([context_positions, block_positions], dim=1) - b.padding[:, None]).clamp(min=0)
        keys = torch.arange(cache.max_len, device=device)[None]
        block_start = (base + fresh)[:, None]
        sequence = (keys >= b.padding[:, None]) & (keys < b.length[:, None])
        visible = sequence | ((keys >= block_start) & (keys < block_start + self.slots))
        mask = visible[:, None, None, :].expand(-1, 1, self.slots, -1).contiguous()  # SDPA kernels want it dense
        out = draft(draft.embed_block(b.anchor), context, position_ids=positions, attention_mask=mask, cache=cache)
        chooser = ProcessorTokenChooser(b.anchor[:, None], self.processors, self.do_sample)
        # threshold 0: draft every slot (no data-dependent break); the confidence stop is applied just below.
        block = draft.draft_block(
            out.draft_hidden_states, b.anchor, chooser, max_tokens=self.count, confidence_threshold=0.0
        )
        b.block_tokens.copy_(block.tokens)
        b.q_logits.copy_(block.q_logits)
        threshold = draft.config.confidence_threshold
        if block.confidence is None or threshold <= 0:
            b.proposed.fill_(self.count)
        else:  # draft_block's stop rule, applied after the whole block was drafted
            b.proposed.copy_(confidence_stop_lengths(block.confidence, threshold, draft.config.confidence_stop))

    def verify_into_buffers(self, model=None) -> None:
        """Verify step: the target over [anchor, N drafted] of each row at cache indices length .. length + N (its
        positions minus the padding); logits and features into the buffers. `model`: the target itself, or (by
        default) the one the step runs, compiled with compile_steps."""
        model = self.verify_target if model is None else model
        b = self.buffers
        b.target_write.copy_(b.length)
        b.target_mask.copy_(self.format_mask(causal_key_mask(b.length, b.padding, self.queries, self.max_len)))
        offsets = torch.arange(self.queries, device=b.anchor.device)
        with contextlib.ExitStack() as installed:
            # hybrid targets: their Gated DeltaNet layers run `block_forward` on our cache entries during the call
            if self.linear_states is not None:
                installed.enter_context(self.linear_states.installed())
            if self.projections is not None:  # skinny_kernels: the projections and the attention
                installed.enter_context(self.projections.installed())
                installed.enter_context(routed_sdpa())
            out = model(
                input_ids=torch.cat([b.anchor[:, None], b.block_tokens], dim=1),
                attention_mask=b.target_mask,
                position_ids=(b.length - b.padding)[:, None] + offsets,
                **{self.keyword: self.target_cache},
                use_cache=True,
                output_hidden_states=self.count > 0,  # plain decoding feeds no draft
            )
        b.logits.copy_(out.logits)
        if self.linear_states is not None:
            self.linear_states.kept.zero_()  # committed: running the step again must not commit this block's states
        if self.count > 0:
            b.features.copy_(extract_target_features(out.hidden_states, self.draft.config.target_layer_ids))

    # -- accept (eager, small) ---------------------------------------------------------------------------------------

    def accept(self, generator: torch.Generator | None) -> list[list[int]]:
        """Verify the blocks, advance the active rows, and read back per row [accepted, next token, proposed,
        *drafted]."""
        b = self.buffers
        if self.count == 0:
            verdict = Verdict(
                b.proposed.new_zeros(self.batch), choose_tokens(b.logits[:, 0], self.processors, self.do_sample)
            )
        else:
            target_logits = warp_block_logits(b.logits, self.processors)
            verdict = verify(b.block_tokens, b.proposed, b.q_logits, target_logits, self.do_sample, generator)
        b.kept.copy_(torch.where(b.active, verdict.accepted + 1, 0))
        if self.linear_states is not None:
            self.linear_states.kept.copy_(b.kept)  # committed by the next verify step
        b.length.add_(b.kept)
        b.anchor.copy_(torch.where(b.active, verdict.next_tokens, b.anchor))
        b.context.copy_(b.features)
        # The round's one host sync.
        summary = [verdict.accepted[:, None], verdict.next_tokens[:, None], b.proposed[:, None], b.block_tokens]
        return torch.cat(summary, dim=1).tolist()

    def stop_rows(self, rows: list[int]) -> None:
        """Rows that finished keep nothing from now on (their counters stop; shapes stay the same)."""
        self.buffers.active[rows] = False


# draft -> {setting key: runner}. Weak on the draft, so dropping the models frees caches and graphs.
_RUNNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Each runner holds full-length caches for its batch (an 8B target at batch 32 and 1k tokens: ~5 GB), so only the
# most recently used settings stay; an evicted one is rebuilt (and recaptured) when it is asked for again. Eight
# covers a benchmark that interleaves every static-path variant at one batch size.
MAX_RUNNERS_PER_DRAFT = 8


def runner_for(
    target,
    draft,
    batch: int,
    needed: int,
    processors,
    do_sample: bool,
    use_graphs: bool,
    sampling_key: tuple,
    draft_tokens: int | None = None,
    compile_steps: bool = False,
    skinny_kernels: bool = False,
) -> StaticSpeculativeRunner:
    """The runner for this setting (target, batch, sampling, graphs, draft tokens, compiling) if its caches hold
    `needed` tokens, else a new one in its place (a longer one: graphs are captured once per setting and length)."""
    runners = _RUNNERS.setdefault(draft, {})
    setting = (use_graphs, draft_tokens, compile_steps, skinny_kernels)
    key = (id(target), batch, sampling_key, *setting, target.dtype, str(target.device))
    runner = runners.pop(key, None)  # re-inserted below: the dict's order is least recently used first
    fresh = runner is None or runner.max_len < needed
    if fresh:
        runner = None  # free the old graphs and caches before allocating new ones
        while len(runners) >= MAX_RUNNERS_PER_DRAFT:
            runners.pop(next(iter(runners)))
        max_len = bucket_length(needed)
        runner = StaticSpeculativeRunner(
            target, draft, batch, max_len, processors, do_sample, use_graphs, key,
            draft_tokens=draft_tokens, compile_steps=compile_steps, skinny_kernels=skinny_kernels,
        )  # fmt: skip
    runners[key] = runner
    if fresh:
        runner.prepare()
    return runner


@torch.no_grad()
def generate_static(
    target,
    draft: DSparkDraftModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    do_sample: bool,
    processors: LogitsProcessorList,
    stop_ids: set[int],
    generator: torch.Generator | None,
    use_graphs: bool,
    sampling_key: tuple,
    on_round: RoundCallback | None = None,
    draft_tokens: int | None = None,
    compile_steps: bool = False,
    skinny_kernels: bool = False,
) -> tuple[list[list[int]], AcceptanceStats, dict[str, float]]:
    """Rows [B, P] (left-padded where attention_mask is 0) through the static loop; returns (generated tokens per
    row, acceptance stats, seconds per phase).

    `on_round` receives a `RoundEvent` per row and round (and one for the prefill's token), as in the dynamic loop.
    `draft_tokens` verifies fewer than the draft's N tokens per round; 0 is plain decoding (one
    target forward per token, no draft), the baseline of the graph path itself. `compile_steps` runs the draft and
    verify steps through `torch.compile` (then, on CUDA, captures the compiled kernels as graphs). `skinny_kernels`
    runs the verify step's projections through `dspark.skinny_linear`'s kernels.
    """
    batch = input_ids.shape[0]
    # A row's last round may keep a whole block past its budget (up to P + max_new_tokens + N entries), and in a
    # batch it then keeps verifying Q more entries while other rows finish.
    queries = draft.config.num_draft_tokens + 1
    needed = input_ids.shape[1] + max_new_tokens + 2 * queries
    runner = runner_for(
        target,
        draft,
        batch,
        needed,
        processors,
        do_sample,
        use_graphs,
        sampling_key,
        draft_tokens,
        compile_steps,
        skinny_kernels,
    )
    acceptance = AcceptanceStats(num_slots=runner.count)
    clock = PhaseClock()  # no rollback phase here: hybrid targets commit their states inside the verify step
    prompt_features = runner.prefill(input_ids, attention_mask)
    generated: list[list[int]] = [[] for _ in range(batch)]
    firsts = runner.buffers.anchor.tolist()
    finished = [
        append_until_stop(generated[row], [token], stop_ids, max_new_tokens)[1] for row, token in enumerate(firsts)
    ]
    clock.lap("prefill")
    if on_round is not None:
        for row, tokens in enumerate(generated):
            on_round(RoundEvent(row, [], [], tokens[0], list(tokens), first=True))
        clock.skip()
    if any(finished):
        runner.stop_rows([row for row, done in enumerate(finished) if done])
    first_round = True
    while not all(finished):
        if first_round:
            runner.draft_into_buffers(prompt_features)  # the prompt's context has its own shape: eager
            first_round = False
        else:
            runner.draft_step()
        clock.lap("draft")
        runner.verify_step()
        summaries = runner.accept(generator)
        clock.lap("verify")
        took_part = [not done for done in finished]
        emitted_counts, newly_finished = [0] * batch, []
        for row, (accepted, next_token, proposed, *drafted) in enumerate(summaries):
            if finished[row]:
                continue
            emitted, done = append_until_stop(
                generated[row], [*drafted[:accepted], next_token], stop_ids, max_new_tokens
            )
            emitted_counts[row] = len(emitted)
            if done:
                finished[row] = True
                newly_finished.append(row)
            if on_round is not None:
                on_round(RoundEvent(row, drafted[:accepted], drafted[accepted:proposed], next_token, emitted))
        if newly_finished:
            runner.stop_rows(newly_finished)
        accepted_counts = torch.tensor([summary[0] for summary in summaries])
        proposed_counts = torch.tensor([summary[2] for summary in summaries])
        acceptance.record(accepted_counts, proposed_counts, torch.tensor(took_part), emitted_counts)
        clock.lap("commit")  # the round's callbacks included: they run row by row inside the commit
    return generated, acceptance, clock.finish()
