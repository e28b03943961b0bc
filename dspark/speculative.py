"""The package's own speculative decoding loop: batches with left padding and per-row acceptance.

Each round, per row: draft a block from the anchor (the last emitted token) conditioned on the verified context,
verify anchor + drafted tokens in one target forward, keep the accepted prefix plus the target's next token.

Rows advance by different amounts, so both caches are kept in a shared "slot" index space: every round appends the
whole verify block (anchor + N drafted slots) for every row, and entries that were rejected, never proposed, or belong
to finished rows are masked out of attention by a per-row key mask. Positions (RoPE) follow each row's real tokens.

Hybrid targets (Qwen3.5/3.6 linear attention) keep recurrent state that masking cannot undo: for them each round
snapshots the recurrent states, verifies, restores the snapshot, trims the attention caches and replays only the kept
tokens. Their rows run one at a time, since the kept lengths differ per row.

Shapes: B rows, P prompt length, N = draft.config.num_draft_tokens, S = draft block size, V vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.cache_utils import DynamicCache

from .acceptance import AcceptanceStats
from .modeling_dspark import (
    DSparkDraftModel,
    ProcessorTokenChooser,
    cache_keyword,
    extract_target_features,
    target_is_stateful,
)
from .verify import verify


@dataclass
class SpeculativeOutput:
    """sequences: [B, P + T] prompt (as given, left-padded) then generated tokens, right-padded with pad_token_id.
    generated: per-row lists of new tokens. stats: acceptance bookkeeping and wall times."""

    sequences: torch.Tensor
    generated: list[list[int]]
    stats: dict = field(default_factory=dict)


@dataclass
class RoundEvent:
    """What one row did in one round, for streaming and visualisation (`on_round` callback).

    accepted: drafted tokens the target kept; rejected: drafted tokens proposed after them and thrown away;
    next_token: the target's own token after the kept ones (a bonus when nothing was rejected, else the correction);
    emitted: the tokens appended to the row's output this round (shorter when a stop token or the budget cut it);
    first: True for the token the prefill produced (no draft involved).
    """

    row: int
    accepted: list[int]
    rejected: list[int]
    next_token: int
    emitted: list[int]
    first: bool = False

    @property
    def bonus(self) -> bool:
        return not self.first and not self.rejected


RoundCallback = Callable[[RoundEvent], None]


@dataclass
class LoopState:
    target_cache: DynamicCache
    cache_keyword: str  # the keyword the target's forward takes `target_cache` under (transformers-version dependent)
    draft_cache: DynamicCache
    target_keys: torch.Tensor  # [B, target cache length] 1 where the entry is part of the row's sequence
    draft_keys: torch.Tensor  # [B, draft cache length] same for the draft's context entries
    context: torch.Tensor  # [B, C, K * H_t] verified target features not yet in the draft cache
    context_keys: torch.Tensor  # [B, C]
    context_positions: torch.Tensor  # [B, C]
    anchor: torch.Tensor  # [B] last emitted token, not yet seen by the target
    anchor_position: torch.Tensor  # [B]
    finished: torch.Tensor  # [B] bool
    generated: list[list[int]]


def sampling_processors(do_sample: bool, temperature: float, top_k: int | None, top_p: float | None):
    """The warpers applied to both the draft's and the target's logits (identical on both sides)."""
    processors = LogitsProcessorList()
    if do_sample:
        if temperature <= 0:
            raise ValueError("dspark: temperature must be > 0 when sampling; use do_sample=False for greedy")
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k:
            processors.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
    return processors


def choose_tokens(logits: torch.Tensor, processors: LogitsProcessorList, do_sample: bool) -> torch.Tensor:
    """[B, V] target logits -> [B] tokens (argmax, or a draw from the processed distribution)."""
    return ProcessorTokenChooser(logits.new_zeros(logits.shape[0], 0, dtype=torch.long), processors, do_sample)(
        logits.float()
    )[1]


def prefill(target, draft, input_ids, attention_mask, processors, do_sample) -> LoopState:
    """Run the target on the prompts, emit each row's first token, keep the prompt features for the draft."""
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=target.config)  # the config adds the linear-attention layers of hybrid targets
    keyword = cache_keyword(target)
    out = target(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        **{keyword: cache},
        use_cache=True,
        output_hidden_states=True,
    )
    first = choose_tokens(out.logits[:, -1], processors, do_sample)
    return LoopState(
        target_cache=cache,
        cache_keyword=keyword,
        draft_cache=DynamicCache(),
        target_keys=attention_mask,
        draft_keys=attention_mask.new_zeros(attention_mask.shape[0], 0),
        context=extract_target_features(out.hidden_states, draft.config.target_layer_ids),
        context_keys=attention_mask,
        context_positions=positions,
        anchor=first,
        anchor_position=attention_mask.sum(-1),
        finished=torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device),
        generated=[[] for _ in range(input_ids.shape[0])],
    )


def draft_round(draft: DSparkDraftModel, state: LoopState, chooser_processors, do_sample: bool):
    """Draft one block per row from its anchor; moves the pending context into the draft cache."""
    slots = draft.config.block_size
    offsets = torch.arange(slots, device=state.anchor.device)
    block_positions = state.anchor_position[:, None] + offsets
    state.draft_keys = torch.cat([state.draft_keys, state.context_keys], dim=1)
    keys = torch.cat([state.draft_keys, torch.ones_like(block_positions)], dim=1)
    out = draft(
        draft.embed_block(state.anchor),
        state.context,
        position_ids=torch.cat([state.context_positions, block_positions], dim=1),
        attention_mask=keys,
        cache=state.draft_cache,
    )
    state.draft_cache.crop(-slots)
    chooser = ProcessorTokenChooser(state.anchor[:, None], chooser_processors, do_sample)
    return draft.draft_block(out.draft_hidden_states, state.anchor, chooser)


def verify_round(target, draft, state: LoopState, block, processors, do_sample, generator):
    """One target forward over [anchor, drafted...] per row; returns the verdict, the number of proposed tokens per
    row, the block's features, slot offsets and the verified tokens."""
    tokens = torch.cat([state.anchor[:, None], block.tokens], dim=1)
    offsets = torch.arange(tokens.shape[1], device=tokens.device)
    proposed = torch.where(state.finished, torch.zeros_like(block.lengths), block.lengths)
    block_keys = (offsets[None] <= proposed[:, None]).long()
    out = target(
        input_ids=tokens,
        attention_mask=torch.cat([state.target_keys, block_keys], dim=1),
        position_ids=state.anchor_position[:, None] + offsets,
        **{state.cache_keyword: state.target_cache},
        use_cache=True,
        output_hidden_states=True,
    )
    target_logits = out.logits.float()
    if processors:
        # Warpers are position-independent, so one call over the flattened positions processes them all.
        flat = target_logits.reshape(-1, target_logits.shape[-1])
        target_logits = processors(flat.new_zeros(flat.shape[0], 0, dtype=torch.long), flat).view_as(target_logits)
    verdict = verify(block.tokens, proposed, block.q_logits, target_logits, do_sample, generator)
    features = extract_target_features(out.hidden_states, draft.config.target_layer_ids)
    return verdict, proposed, features, offsets, tokens


class RecurrentStateSnapshot:
    """Copies of a hybrid cache's recurrent (conv and linear-attention) states and of its attention cache length."""

    def __init__(self, cache: DynamicCache):
        self.cache = cache
        self.attention_length = cache.get_seq_length()
        self.saved = [
            (layer, _clone_states(layer.conv_states), _clone_states(getattr(layer, "recurrent_states", {})))
            for layer in cache.layers
            if hasattr(layer, "conv_states")
        ]

    def rewind(self) -> None:
        """Put the recurrent states back and drop attention entries added since the snapshot."""
        for layer, conv, recurrent in self.saved:
            layer.conv_states.update(_clone_states(conv))
            if recurrent:
                layer.recurrent_states.update(_clone_states(recurrent))
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4:
                layer.keys = layer.keys[..., : self.attention_length, :]
                layer.values = layer.values[..., : self.attention_length, :]


def _clone_states(states: dict) -> dict:
    return {index: None if state is None else state.clone() for index, state in states.items()}


def rewind_and_replay(target, state: LoopState, snapshot: RecurrentStateSnapshot, tokens, verdict) -> None:
    """Hybrid targets: undo the verify forward, then run the target over the kept tokens only (batch of one row).

    When every verified token is kept (the whole block accepted), the verify forward already left the recurrent
    states and attention caches where the replay would: nothing is undone and no second forward runs."""
    keep = int(verdict.accepted[0]) + 1
    state.target_keys = torch.cat([state.target_keys, state.target_keys.new_ones(1, keep)], dim=1)
    if keep == tokens.shape[1]:
        return
    snapshot.rewind()
    target(
        input_ids=tokens[:, :keep],
        attention_mask=state.target_keys,
        position_ids=state.anchor_position[:, None] + torch.arange(keep, device=tokens.device),
        **{state.cache_keyword: state.target_cache},
        use_cache=True,
        logits_to_keep=1,
    )


def keep_verified_entries(state: LoopState, verdict, offsets) -> None:
    """Attention-only targets: keep the anchor and accepted entries of the verify block, mask the rest."""
    kept = (offsets[None] <= verdict.accepted[:, None]) & ~state.finished[:, None]
    state.target_keys = torch.cat([state.target_keys, kept.long()], dim=1)


def commit_round(state: LoopState, block, verdict, features, offsets, limits) -> list[int]:
    """Keep each row's accepted prefix + next token as draft context and output; advance anchors; stop finished rows.

    Returns the number of tokens each row emitted this round."""
    max_new_tokens, stop_ids = limits
    kept = (offsets[None] <= verdict.accepted[:, None]) & ~state.finished[:, None]
    state.context = features
    state.context_keys = kept.long()
    state.context_positions = state.anchor_position[:, None] + offsets
    accepted = verdict.accepted.tolist()
    drafted = block.tokens.tolist()
    next_tokens = verdict.next_tokens.tolist()
    emitted = [0] * len(state.generated)
    for row, output in enumerate(state.generated):
        if state.finished[row]:
            continue
        for token in [*drafted[row][: accepted[row]], next_tokens[row]]:
            output.append(token)
            emitted[row] += 1
            if token in stop_ids or len(output) >= max_new_tokens:
                state.finished[row] = True
                break
    state.anchor_position = state.anchor_position + verdict.accepted + 1
    state.anchor = verdict.next_tokens
    return emitted


def emit_first_tokens(state: LoopState, max_new_tokens: int, stop_ids: set[int]) -> list[RoundEvent]:
    events = []
    for row, token in enumerate(state.anchor.tolist()):
        state.generated[row].append(token)
        events.append(RoundEvent(row, [], [], token, [token], first=True))
        if token in stop_ids or max_new_tokens <= 1:
            state.finished[row] = True
    return events


def round_events(block, verdict, proposed, active, emitted: list[int], state: LoopState) -> list[RoundEvent]:
    """Per-row `RoundEvent`s of the round just committed (rows that took part only)."""
    events = []
    drafted, accepted, lengths = block.tokens.tolist(), verdict.accepted.tolist(), proposed.tolist()
    for row, (took_part, count) in enumerate(zip(active.tolist(), emitted)):
        if not took_part:
            continue
        kept = accepted[row]
        output = state.generated[row]
        events.append(
            RoundEvent(
                row=row,
                accepted=drafted[row][:kept],
                rejected=drafted[row][kept : lengths[row]],
                next_token=int(verdict.next_tokens[row]),
                emitted=output[len(output) - count :],
            )
        )
    return events


def assemble(input_ids: torch.Tensor, generated: list[list[int]], pad_token_id: int) -> torch.Tensor:
    longest = max(len(tokens) for tokens in generated)
    tail = input_ids.new_full((input_ids.shape[0], longest), pad_token_id)
    for row, tokens in enumerate(generated):
        tail[row, : len(tokens)] = torch.tensor(tokens, dtype=tail.dtype)
    return torch.cat([input_ids, tail], dim=1)


@torch.no_grad()
def speculative_generate(
    target,
    draft: DSparkDraftModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    return_stats: bool = False,
    on_round: RoundCallback | None = None,
    static_cache: bool = False,
    cuda_graphs: bool | None = None,
    compile_steps: bool = False,
) -> torch.Tensor | SpeculativeOutput:
    """Generate with `draft` proposing and `target` verifying; greedy output equals the target's own, sampling is exact.

    input_ids: [B, P] prompts, left-padded where `attention_mask` [B, P] has zeros. Returns [B, P + T] sequences
    (prompt as given, then each row's tokens, right-padded with `pad_token_id`), or a `SpeculativeOutput` with
    per-row acceptance statistics and wall times when `return_stats=True`. `on_round`, if given, receives a
    `RoundEvent` per row and round as soon as the round is verified (streaming, visualisation).

    static_cache=True: the fast path of `dspark.static_loop` (attention-only targets with sdpa or eager attention,
    any batch): preallocated caches and fixed shapes every round. cuda_graphs (default: on for CUDA targets when
    static_cache=True) captures its draft and verify steps as CUDA graphs; it needs static_cache=True and CUDA.
    compile_steps=True (static_cache=True only) runs both steps through `torch.compile` first, which fuses the small
    kernels a graph would still replay one by one; the first call per setting compiles (tens of seconds).
    Unsupported settings raise a ValueError that names the way out.
    """
    if draft.target is not target:
        draft.bind_target(target, allow_stateful=True)
    if max_new_tokens < 1:
        raise ValueError(f"dspark: max_new_tokens={max_new_tokens} must be >= 1")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"dspark: attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("dspark: prompts must be left-padded (attention_mask ends with 1 in every row)")
    eos = eos_token_id if eos_token_id is not None else target.generation_config.eos_token_id
    stop_ids = set(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
    if pad_token_id is None:
        pad_token_id = target.generation_config.pad_token_id
    if pad_token_id is None:
        pad_token_id = min(stop_ids) if stop_ids else 0
    settings = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        processors=sampling_processors(do_sample, temperature, top_k, top_p),
        stop_ids=stop_ids,
        generator=generator,
    )
    attention_mask = attention_mask.long()
    use_graphs = resolve_cuda_graphs(target, static_cache, cuda_graphs)
    if compile_steps and not static_cache:
        raise ValueError("dspark: compile_steps=True needs static_cache=True (it compiles the fixed-shape steps)")
    if static_cache:
        from .static_loop import check_static_support, generate_static  # static_loop imports RoundEvent from here

        check_static_support(target)
        generated, acceptance, seconds = generate_static(
            target,
            draft,
            input_ids,
            attention_mask,
            **settings,
            use_graphs=use_graphs,
            sampling_key=(do_sample, temperature, top_k, top_p),
            on_round=on_round,
            compile_steps=compile_steps,
        )
        runs = [RunResult(generated, acceptance, seconds)]
    elif target_is_stateful(target):
        # Recurrent state is rewound per row (kept lengths differ), so hybrid rows run one at a time.
        rows = [input_ids[row : row + 1, attention_mask[row].bool()] for row in range(input_ids.shape[0])]
        runs = [
            _generate(target, draft, row, torch.ones_like(row), **settings, on_round=_renumber(on_round, index))
            for index, row in enumerate(rows)
        ]
    else:
        runs = [_generate(target, draft, input_ids, attention_mask, **settings, on_round=on_round)]
    generated = [tokens for run in runs for tokens in run.generated]
    sequences = assemble(input_ids, generated, pad_token_id)
    if not return_stats:
        return sequences
    stats = AcceptanceStats.concatenate([run.acceptance for run in runs]).summary()
    seconds = {phase: sum(run.seconds[phase] for run in runs) for phase in runs[0].seconds}
    return SpeculativeOutput(sequences, generated, {**stats, "seconds": seconds})


def resolve_cuda_graphs(target, static_cache: bool, cuda_graphs: bool | None) -> bool:
    """Whether to capture CUDA graphs: by default whenever the static path runs on CUDA."""
    on_cuda = target.device.type == "cuda"
    if cuda_graphs is None:
        return static_cache and on_cuda
    if cuda_graphs and not static_cache:
        raise ValueError("dspark: cuda_graphs=True needs static_cache=True (graphs replay fixed shapes and buffers)")
    if cuda_graphs and not on_cuda:
        raise ValueError(f"dspark: cuda_graphs=True needs a CUDA target (the target is on {target.device})")
    return cuda_graphs


def _renumber(on_round: RoundCallback | None, row: int) -> RoundCallback | None:
    """Hybrid rows run one at a time as batches of one; report them under their row in the caller's batch."""
    if on_round is None:
        return None

    def forward(event: RoundEvent) -> None:
        event.row = row
        on_round(event)

    return forward


@dataclass
class RunResult:
    generated: list[list[int]]
    acceptance: AcceptanceStats
    seconds: dict[str, float]


def _generate(
    target, draft, input_ids, attention_mask, max_new_tokens, do_sample, processors, stop_ids, generator, on_round
):
    """The loop for one batch whose rows can share the target cache (all rows, or one row of a hybrid target)."""
    stateful = target_is_stateful(target)
    acceptance = AcceptanceStats(num_slots=draft.config.num_draft_tokens)
    seconds = {"prefill": 0.0, "draft": 0.0, "verify": 0.0, "commit": 0.0}

    started = time.perf_counter()
    state = prefill(target, draft, input_ids, attention_mask, processors, do_sample)
    first_events = emit_first_tokens(state, max_new_tokens, stop_ids)
    seconds["prefill"] = time.perf_counter() - started
    if on_round is not None:
        for event in first_events:
            on_round(event)
    while not bool(state.finished.all()):
        tick = time.perf_counter()
        block = draft_round(draft, state, processors, do_sample)
        tock = time.perf_counter()
        seconds["draft"] += tock - tick
        snapshot = RecurrentStateSnapshot(state.target_cache) if stateful else None
        verdict, proposed, features, offsets, tokens = verify_round(
            target, draft, state, block, processors, do_sample, generator
        )
        if stateful:
            rewind_and_replay(target, state, snapshot, tokens, verdict)
        else:
            keep_verified_entries(state, verdict, offsets)
        tick = time.perf_counter()
        seconds["verify"] += tick - tock
        active = ~state.finished
        emitted = commit_round(state, block, verdict, features, offsets, (max_new_tokens, stop_ids))
        acceptance.record(verdict.accepted, proposed, active, emitted)
        seconds["commit"] += time.perf_counter() - tick
        if on_round is not None:
            for event in round_events(block, verdict, proposed, active, emitted, state):
                on_round(event)

    seconds["total"] = time.perf_counter() - started
    return RunResult(state.generated, acceptance, seconds)
