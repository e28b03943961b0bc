"""Offline acceptance: how many tokens per round a draft would earn on known target continuations.

One target forward per sequence gives the draft's context features and the target's distributions; every draft is
evaluated on the same sequences and anchors, so two drafts can be compared pairwise.

* Temperature 0 (the continuation must be the target's own greedy output): every anchor's block is drafted with the
  Markov head running free inside the block, exactly as at inference (`draft.draft_block`), and compared with the
  continuation. `chain` replays the actual speculative loop (first round anchored at the first generated token,
  next anchor = anchor + accepted + 1), so its numbers equal what `speculative_generate` reports for that
  continuation; `every_anchor_length` averages over all anchors instead.
* Temperature > 0: the expected acceptance length under teacher forcing: slot j keeps its token with probability
  sum_x min(p_j, q_j) where q_j uses the data token as the Markov head's previous token. An expectation, not a
  replay: say so wherever it is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..acceptance import AcceptanceStats, expected_acceptance_length
from ..anchors import Anchors, draft_hidden_at_anchors, every_anchor, slot_targets
from ..modeling_dspark import DSparkDraftModel, ProcessorTokenChooser, extract_target_features
from ..verify import accept_prefix, acceptance_probability


@dataclass
class SequenceAcceptance:
    """One draft on one sequence. chain_tokens / chain_rounds is that sequence's acceptance length (bonus included)."""

    id: str
    domain: str
    chain_tokens: int = 0
    chain_rounds: int = 0
    anchor_length_sum: float = 0.0
    anchors: int = 0
    slot_probability_sum: list[float] | None = None  # T > 0: sum over anchors of alpha_j (slot j's keep probability)
    slot_count: list[int] | None = None


@dataclass
class DraftAcceptance:
    """Everything measured for one draft: the loop replay's `AcceptanceStats` (one row per sequence) and
    per-sequence numbers."""

    num_slots: int
    sequences: list[SequenceAcceptance] = field(default_factory=list)
    replays: list[AcceptanceStats] = field(default_factory=list)

    @property
    def chain(self) -> AcceptanceStats:
        if not self.replays:
            return AcceptanceStats(num_slots=self.num_slots)
        return AcceptanceStats.concatenate(self.replays)

    def summary(self, domain: str | None = None) -> dict:
        chosen = [s for s in self.sequences if domain is None or s.domain == domain]
        tokens = sum(s.chain_tokens for s in chosen)
        rounds = sum(s.chain_rounds for s in chosen)
        anchors = sum(s.anchors for s in chosen)
        result = {
            "sequences": len(chosen),
            "rounds": rounds,
            "acceptance_length": tokens / rounds if rounds else None,
            "every_anchor_length": sum(s.anchor_length_sum for s in chosen) / anchors if anchors else None,
        }
        replays = [r for r, s in zip(self.replays, self.sequences) if domain is None or s.domain == domain]
        if replays:
            chain = AcceptanceStats.concatenate(replays).summary()
            result["per_position_acceptance"] = chain["per_position_acceptance"]
            result["acceptance_length_histogram"] = chain["acceptance_length_histogram"]
        elif chosen and chosen[0].slot_count is not None:
            # expected conditional acceptance of each slot (teacher-forced), averaged over anchors
            sums = [sum(s.slot_probability_sum[j] for s in chosen) for j in range(self.num_slots)]
            counts = [sum(s.slot_count[j] for s in chosen) for j in range(self.num_slots)]
            result["per_position_acceptance"] = [a / n if n else None for a, n in zip(sums, counts)]
            result["expectation"] = "teacher-forced expected acceptance, not a replay of the loop"
        return result


def _greedy_chooser(anchor_ids: torch.Tensor) -> ProcessorTokenChooser:
    return ProcessorTokenChooser(anchor_ids[:, None], None, do_sample=False)


def accepted_at_anchors(
    draft: DSparkDraftModel,
    features: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    anchors: Anchors,
    max_draft_tokens: int | None,
    confidence_threshold: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy drafting at every anchor of one sequence (batch of 1).

    Returns accepted [A] (drafted tokens equal to the continuation, a prefix), proposed [A] (tokens the draft
    offered after its confidence stop) and known [A] (slots whose true token lies inside the continuation).
    """
    hidden = draft_hidden_at_anchors(draft, features, input_ids, anchors)[0]  # [A, N, H]
    anchor_ids = input_ids[0, anchors.positions[0]]
    block = draft.draft_block(
        hidden,
        anchor_ids,
        _greedy_chooser(anchor_ids),
        max_tokens=max_draft_tokens,
        confidence_threshold=confidence_threshold,
    )
    count = block.tokens.shape[1]
    slots = slot_targets(input_ids, loss_mask, anchors, count)
    offered = torch.arange(count, device=input_ids.device)[None] < block.lengths[:, None]
    matches = (block.tokens == slots.labels[0]) & slots.valid[0] & offered
    return accept_prefix(matches), block.lengths, slots.valid[0].sum(dim=1)


def replay_chain(
    accepted: torch.Tensor,
    proposed: torch.Tensor,
    known: torch.Tensor,
    anchor_positions: list[int],
    prompt_length: int,
    length: int,
    stats: AcceptanceStats,
) -> tuple[int, int]:
    """Walk the rounds the loop would take; record each into `stats`. Returns (tokens emitted after the first, rounds).

    The loop's first token comes from the prefill; a round anchored at position a emits accepted + 1 tokens (cut at
    the end of the continuation, as the loop cuts at its token budget or stop token).
    """
    index_of = {position: index for index, position in enumerate(anchor_positions)}
    anchor, emitted_total, rounds = prompt_length, 0, 0
    while anchor < length - 1:
        index = index_of[anchor]
        kept = int(accepted[index])
        # a match that reaches the end of the known tokens is cut by the budget either way
        emitted = min(kept + 1, length - 1 - anchor)
        stats.record(
            torch.tensor([min(kept, int(known[index]))]),
            proposed[index : index + 1].cpu(),
            torch.tensor([True]),
            [emitted],
        )
        emitted_total += emitted
        rounds += 1
        anchor += kept + 1
    return emitted_total, rounds


@torch.no_grad()
def offline_acceptance(
    target,
    drafts: dict[str, DSparkDraftModel],
    sequences: list[dict],
    temperature: float = 0.0,
    max_draft_tokens: int | None = None,
    confidence_threshold: float | None = 0.0,
    anchor_chunk: int = 256,
    progress: bool = False,
) -> dict[str, DraftAcceptance]:
    """Acceptance of each draft on `sequences` (records with input_ids, prompt_length, id, domain).

    At temperature 0 the sequences must be the target's greedy continuations (what `dspark data respond
    --temperature 0` writes); `confidence_threshold` 0 disables the early stop, None uses each draft's config.
    """
    results = {name: DraftAcceptance(num_slots=_slots(draft, max_draft_tokens)) for name, draft in drafts.items()}
    device = next(target.parameters()).device
    iterator = sequences
    if progress:
        try:
            from tqdm.auto import tqdm

            iterator = tqdm(sequences, desc="offline acceptance", dynamic_ncols=True)
        except ImportError:
            pass
    for record in iterator:
        input_ids = torch.tensor([record["input_ids"]], device=device)
        length, prompt_length = input_ids.shape[1], record["prompt_length"]
        out = target(input_ids=input_ids, output_hidden_states=True)
        loss_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        loss_mask[:, prompt_length:] = True
        anchors = every_anchor(loss_mask)
        for name, draft in drafts.items():
            features = extract_target_features(out.hidden_states, draft.config.target_layer_ids)
            entry = SequenceAcceptance(record.get("id", ""), record.get("domain", "all"))
            if temperature > 0:
                lengths, slot_sums, slot_counts = _expected_lengths(
                    draft,
                    features,
                    out.logits,
                    input_ids,
                    loss_mask,
                    anchors,
                    temperature,
                    max_draft_tokens,
                    anchor_chunk,
                )
                entry.anchor_length_sum, entry.anchors = float(lengths.sum()), lengths.numel()
                entry.slot_probability_sum, entry.slot_count = slot_sums.tolist(), slot_counts.tolist()
                # an expectation has no rounds to replay: report it per anchor
                entry.chain_tokens, entry.chain_rounds = entry.anchor_length_sum, entry.anchors
            else:
                accepted, proposed, known = _chunked(
                    draft, features, input_ids, loss_mask, anchors, max_draft_tokens, confidence_threshold, anchor_chunk
                )
                entry.anchor_length_sum = float((accepted + 1).sum())
                entry.anchors = accepted.numel()
                positions = anchors.positions[0, anchors.valid[0]].tolist()
                replay = AcceptanceStats(num_slots=results[name].num_slots)
                entry.chain_tokens, entry.chain_rounds = replay_chain(
                    accepted, proposed, known, positions, prompt_length, length, replay
                )
                results[name].replays.append(replay)
            results[name].sequences.append(entry)
    return results


def _slots(draft: DSparkDraftModel, max_draft_tokens: int | None) -> int:
    count = draft.config.num_draft_tokens
    return count if max_draft_tokens is None else min(count, max_draft_tokens)


def _anchor_chunks(anchors: Anchors, chunk: int):
    positions = anchors.positions[:, anchors.valid[0]]
    for start in range(0, positions.shape[1], chunk):
        part = positions[:, start : start + chunk]
        yield Anchors(part, torch.ones_like(part, dtype=torch.bool))


def _chunked(draft, features, input_ids, loss_mask, anchors, max_draft_tokens, confidence_threshold, chunk):
    parts = [
        accepted_at_anchors(draft, features, input_ids, loss_mask, part, max_draft_tokens, confidence_threshold)
        for part in _anchor_chunks(anchors, chunk)
    ]
    return tuple(torch.cat([part[i] for part in parts]).cpu() for i in range(3))


def _expected_lengths(
    draft, features, target_logits, input_ids, loss_mask, anchors, temperature, max_draft_tokens, chunk
) -> torch.Tensor:
    """Under teacher forcing: [A] expected tokens per round (bonus included) at every anchor, and per slot [n] the
    sum of keep probabilities and the number of anchors where the slot is valid."""
    count = _slots(draft, max_draft_tokens)
    lengths = []
    slot_sums = torch.zeros(count, dtype=torch.float64)
    slot_counts = torch.zeros(count, dtype=torch.long)
    for part in _anchor_chunks(anchors, chunk):
        hidden = draft_hidden_at_anchors(draft, features, input_ids, part)[0, :, :count]  # [A, n, H]
        slots = slot_targets(input_ids, loss_mask, part, count)
        draft_logits = draft.slot_logits(draft.block_logits(hidden), slots.previous[0], hidden)
        target = target_logits[0, slots.target_positions[0]].float()
        alpha = acceptance_probability(target / temperature, draft_logits / temperature)
        valid = slots.valid[0]
        lengths.append(expected_acceptance_length(alpha, valid.float()).cpu())
        slot_sums += (alpha * valid).sum(0).double().cpu()
        slot_counts += valid.sum(0).cpu()
    return torch.cat(lengths), slot_sums, slot_counts
