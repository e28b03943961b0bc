"""The package's own speculative decoding loop: batches with left padding and per-row acceptance.

Each round, per row: draft a block from the anchor (the last emitted token) conditioned on the verified context,
verify anchor + drafted tokens in one target forward, keep the accepted prefix plus the target's next token.

Rows advance by different amounts, so both caches are kept in a shared "slot" index space: every round appends the
whole verify block (anchor + N drafted slots) for every row, and entries that were rejected, never proposed, or belong
to finished rows are masked out of attention by a per-row key mask. Positions (RoPE) follow each row's real tokens.

Hybrid targets (Qwen3.5/3.6 linear attention) keep recurrent state that masking cannot undo: for them each round
snapshots the linear-attention states before verifying; afterwards rows that kept the whole block go on as they are,
and the others are replayed from the snapshot over their kept tokens, one forward per distinct kept length (the rows
of a batch share it); their attention entries are masked like everyone's.

Shapes: B rows, P prompt length, N = draft.config.num_draft_tokens, S = draft block size, V vocabulary.
"""

from __future__ import annotations

import copy
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


def warp_block_logits(logits: torch.Tensor, processors: LogitsProcessorList) -> torch.Tensor:
    """[B, Q, V] target logits of a verify block -> the same through the warpers. Warpers are position-independent,
    so one call over the flattened positions processes them all."""
    if not processors:
        return logits
    flat = logits.reshape(-1, logits.shape[-1])
    return processors(flat.new_zeros(flat.shape[0], 0, dtype=torch.long), flat).view_as(logits)


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
    target_logits = warp_block_logits(out.logits.float(), processors)
    verdict = verify(block.tokens, proposed, block.q_logits, target_logits, do_sample, generator)
    features = extract_target_features(out.hidden_states, draft.config.target_layer_ids)
    return verdict, proposed, features, offsets, tokens


class RecurrentStateSnapshot:
    """A hybrid cache's linear-attention states (conv and recurrent) as they were before a verify forward, and the
    number of attention entries then.

    Attention entries need no snapshot: the verify block's entries stay in the cache and the rejected ones are masked
    (as for attention-only targets). Recurrent state folds every token in, so it is what gets rolled back.
    """

    def __init__(self, cache: DynamicCache):
        self.cache = cache
        self.attention_length = cache.get_seq_length()
        self.saved = {
            id(layer): (_clone_states(layer.conv_states), _clone_states(getattr(layer, "recurrent_states", {})))
            for layer in cache.layers
            if hasattr(layer, "conv_states")
        }

    def restore_rows(self, rows: torch.Tensor) -> None:
        """Put the saved states back in these rows, in place (the cache's tensors keep their addresses)."""
        for layer in self.cache.layers:
            if id(layer) in self.saved:
                conv, recurrent = self.saved[id(layer)]
                _copy_rows(layer.conv_states, _select_rows(conv, rows), rows)
                _copy_rows(getattr(layer, "recurrent_states", {}), _select_rows(recurrent, rows), rows)

    def rows_before_verify(self, rows: torch.Tensor) -> DynamicCache:
        """A cache of these rows as it was before the verify forward: attention entries up to the snapshot and the
        saved linear states, all copies, so running the target on it leaves the shared cache untouched."""
        view = copy.copy(self.cache)
        view.layers = []
        for layer in self.cache.layers:
            part = copy.copy(layer)
            if id(layer) in self.saved:
                conv, recurrent = self.saved[id(layer)]
                part.conv_states = _select_rows(conv, rows)
                if recurrent:
                    part.recurrent_states = _select_rows(recurrent, rows)
            elif getattr(layer, "keys", None) is not None and layer.keys.dim() == 4:
                part.keys = layer.keys[rows, :, : self.attention_length]
                part.values = layer.values[rows, :, : self.attention_length]
            view.layers.append(part)
        return view

    def take_rows(self, replayed: DynamicCache, rows: torch.Tensor) -> None:
        """Copy the linear states a replay left in `replayed` (from `rows_before_verify(rows)`) into these rows."""
        for layer, part in zip(self.cache.layers, replayed.layers):
            if id(layer) in self.saved:
                _copy_rows(layer.conv_states, part.conv_states, rows)
                _copy_rows(getattr(layer, "recurrent_states", {}), getattr(part, "recurrent_states", {}), rows)


def _clone_states(states: dict) -> dict:
    return {index: None if state is None else state.clone() for index, state in states.items()}


def _select_rows(states: dict, rows: torch.Tensor) -> dict:
    return {index: None if state is None else state[rows] for index, state in states.items()}


def _copy_rows(destination: dict, source: dict, rows: torch.Tensor) -> None:
    """destination[i][rows] = source[i] for each state index (source: [len(rows), ...], in place)."""
    for index, state in source.items():
        if state is not None and destination.get(index) is not None:
            destination[index][rows] = state


def roll_back_recurrent_states(
    target, state: LoopState, snapshot: RecurrentStateSnapshot, tokens, kept: torch.Tensor, keys_before: torch.Tensor
) -> None:
    """Hybrid targets: the verify forward advanced every row's recurrent state over all Q verified tokens [B, Q]; each
    row must continue from its kept ones (anchor + accepted).

    Rows that kept all Q are already there (no forward). Rows finished before this round get the snapshot back (they
    stand still). The rest are replayed from the snapshot over their kept tokens, one target forward per distinct
    kept length, shared by the rows of that length; only their linear states are taken from the replay (the attention
    entries of the kept tokens are the verify forward's). kept: [B, Q] from `kept_slots`; `keys_before`: [B, L0] the
    key mask before this round."""
    full = tokens.shape[1]
    keep = kept.sum(dim=1).tolist()
    device = tokens.device

    def rows_with(length: int) -> torch.Tensor:
        return torch.tensor([row for row, kept in enumerate(keep) if kept == length], device=device)

    if 0 in keep:
        snapshot.restore_rows(rows_with(0))
    for length in sorted(set(keep) - {0, full}):
        rows = rows_with(length)
        replay_cache = snapshot.rows_before_verify(rows)
        target(
            input_ids=tokens[rows, :length],
            attention_mask=torch.cat([keys_before[rows], keys_before.new_ones(len(rows), length)], dim=1),
            position_ids=state.anchor_position[rows, None] + torch.arange(length, device=device),
            **{state.cache_keyword: replay_cache},
            use_cache=True,
            logits_to_keep=1,
        )
        snapshot.take_rows(replay_cache, rows)


def kept_slots(verdict, offsets: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
    """[B, Q] bool: the verify block's entries each row keeps (its anchor and accepted tokens; none once finished)."""
    return (offsets[None] <= verdict.accepted[:, None]) & ~finished[:, None]


def keep_verified_entries(state: LoopState, kept: torch.Tensor) -> None:
    """Keep the anchor and accepted entries of the verify block in the attention cache, mask the rest (every target;
    hybrid targets also roll their recurrent state back)."""
    state.target_keys = torch.cat([state.target_keys, kept.long()], dim=1)


def commit_round(state: LoopState, block, verdict, features, offsets, kept, limits) -> list[int]:
    """Keep each row's accepted prefix + next token as draft context and output; advance anchors; stop finished rows.

    kept: [B, Q] from `kept_slots`. Returns the number of tokens each row emitted this round."""
    max_new_tokens, stop_ids = limits
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
        round_tokens = [*drafted[row][: accepted[row]], next_tokens[row]]
        appended, done = append_until_stop(output, round_tokens, stop_ids, max_new_tokens)
        emitted[row] = len(appended)
        if done:
            state.finished[row] = True
    state.anchor_position = state.anchor_position + verdict.accepted + 1
    state.anchor = verdict.next_tokens
    return emitted


def append_until_stop(
    output: list[int], tokens: list[int], stop_ids: set[int], max_new_tokens: int
) -> tuple[list[int], bool]:
    """Append a round's tokens to a row's output up to and including the first stop token, or as many as its budget
    of `max_new_tokens` allows; returns (the tokens appended, whether the row is now finished)."""
    for count, token in enumerate(tokens, start=1):
        output.append(token)
        if token in stop_ids or len(output) >= max_new_tokens:
            return tokens[:count], True
    return tokens, False


def emit_first_tokens(state: LoopState, max_new_tokens: int, stop_ids: set[int]) -> list[RoundEvent]:
    events = []
    for row, token in enumerate(state.anchor.tolist()):
        _, done = append_until_stop(state.generated[row], [token], stop_ids, max_new_tokens)
        events.append(RoundEvent(row, [], [], token, [token], first=True))
        if done:
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
    skinny_kernels: bool = False,
) -> torch.Tensor | SpeculativeOutput:
    """Generate with `draft` proposing and `target` verifying; greedy output equals the target's own, sampling is exact.

    input_ids: [B, P] prompts, left-padded where `attention_mask` [B, P] has zeros. Returns [B, P + T] sequences
    (prompt as given, then each row's tokens, right-padded with `pad_token_id`), or a `SpeculativeOutput` with
    per-row acceptance statistics and wall times when `return_stats=True`. `on_round`, if given, receives a
    `RoundEvent` per row and round as soon as the round is verified (streaming, visualisation).

    static_cache=True: the fast path of `dspark.static_loop` (attention-only targets with sdpa or eager attention,
    and Qwen3.5/3.6 hybrids; any batch): preallocated caches and fixed shapes every round. cuda_graphs (default: on
    for CUDA targets when static_cache=True) captures its draft and verify steps as CUDA graphs; it needs
    static_cache=True and CUDA.
    compile_steps=True (static_cache=True only) runs both steps through `torch.compile` first, which fuses the small
    kernels a graph would still replay one by one; the first call per setting compiles (tens of seconds).
    skinny_kernels=True (static_cache=True, a bf16 / fp16 target on a CUDA GPU, Triton installed) runs the verify
    step's projections through `dspark.skinny_linear`'s weight-streaming kernels instead of cuBLAS, and its attention
    through `dspark.verify_attention`'s kernel instead of SDPA.
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
    if skinny_kernels and not static_cache:
        raise ValueError("dspark: skinny_kernels=True needs static_cache=True (the kernels run in its verify step)")
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
            skinny_kernels=skinny_kernels,
        )
        run = RunResult(generated, acceptance, seconds)
    else:
        run = _generate(target, draft, input_ids, attention_mask, **settings, on_round=on_round)
    sequences = assemble(input_ids, run.generated, pad_token_id)
    if not return_stats:
        return sequences
    return SpeculativeOutput(sequences, run.generated, {**run.acceptance.summary(), "seconds": run.seconds})


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


class PhaseClock:
    """Wall seconds per phase of one generation (host clock: on a GPU a phase's kernels may still run when the next
    phase starts, until its first read-back). Each lap adds the time since the previous lap to a phase. rollback:
    the dynamic loop's snapshot and replay of hybrid targets' state (0 for attention-only targets, and on the static
    path, whose hybrids commit their state inside the verify step)."""

    PHASES = ("prefill", "draft", "verify", "rollback", "commit")

    def __init__(self):
        self.seconds = dict.fromkeys(self.PHASES, 0.0)
        self.started = self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] += now - self.last
        self.last = now

    def skip(self) -> None:
        """Start the next lap now: what ran since the last one (a caller's callback) is no phase of ours."""
        self.last = time.perf_counter()

    def finish(self) -> dict[str, float]:
        """The phases and the whole generation's wall time ("total", callbacks included)."""
        return {**self.seconds, "total": time.perf_counter() - self.started}


@dataclass
class RunResult:
    generated: list[list[int]]
    acceptance: AcceptanceStats
    seconds: dict[str, float]


def _generate(
    target, draft, input_ids, attention_mask, max_new_tokens, do_sample, processors, stop_ids, generator, on_round
):
    """The dynamic loop over one batch (attention-only and hybrid targets)."""
    stateful = target_is_stateful(target)
    acceptance = AcceptanceStats(num_slots=draft.config.num_draft_tokens)
    clock = PhaseClock()
    state = prefill(target, draft, input_ids, attention_mask, processors, do_sample)
    first_events = emit_first_tokens(state, max_new_tokens, stop_ids)
    clock.lap("prefill")
    if on_round is not None:
        for event in first_events:
            on_round(event)
        clock.skip()
    while not bool(state.finished.all()):
        block = draft_round(draft, state, processors, do_sample)
        clock.lap("draft")
        if stateful:
            snapshot, keys_before = RecurrentStateSnapshot(state.target_cache), state.target_keys
            clock.lap("rollback")
        verdict, proposed, features, offsets, tokens = verify_round(
            target, draft, state, block, processors, do_sample, generator
        )
        kept = kept_slots(verdict, offsets, state.finished)
        keep_verified_entries(state, kept)
        clock.lap("verify")
        if stateful:
            roll_back_recurrent_states(target, state, snapshot, tokens, kept, keys_before)
            clock.lap("rollback")
        active = ~state.finished
        emitted = commit_round(state, block, verdict, features, offsets, kept, (max_new_tokens, stop_ids))
        acceptance.record(verdict.accepted, proposed, active, emitted)
        clock.lap("commit")
        if on_round is not None:
            for event in round_events(block, verdict, proposed, active, emitted, state):
                on_round(event)
            clock.skip()
    return RunResult(state.generated, acceptance, clock.finish())
