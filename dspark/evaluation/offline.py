"""Offline acceptance: how many tokens per round drafts would earn on known target continuations.

One target forward per batch of sequences gives the draft's context features and the target's distributions; every
draft, and every drafting setting (K, confidence threshold), is scored on those same sequences and anchors, which is
what makes a paired comparison of two drafts valid. The training loop calls `offline_acceptance` for its held-out
evaluation; `dspark eval` calls it per prompt set and temperature.

* Temperature 0 (the sequences must be the target's own greedy continuations): the block of every anchor is drafted
  by `draft.draft_block`, the Markov sampling step itself, with the greedy chooser (the Markov head running free
  inside the block, as at inference) and compared with the continuation. The loop is then replayed: the first round
  is anchored at the first response token (the target's prefill produced it), a round at anchor a emits
  accepted + 1 tokens and the next round is anchored at a + accepted + 1, until the continuation (or the token
  budget) ends. Those rounds are recorded exactly as `speculative_generate(..., return_stats=True)` records its own,
  so the numbers are the loop's numbers for that continuation. `every_anchor_length` averages over all anchors whose
  block lies inside the continuation instead.
* Temperature > 0: the expected acceptance under teacher forcing, per anchor. Slot j is kept with probability
  alpha_j = sum_x min(p_j, q_j), p_j the target's distribution at a + j and q_j the draft's at temperature T with
  the data token as the Markov head's previous token (`draft_block` fed the data tokens). The expected tokens per
  round are 1 + sum_k prod_{j<=k} alpha_j. An expectation, not a replay: every output says so.

Shapes: B sequences per batch, L their padded length, A anchors per row, M anchors of a chunk (flattened), N drafting
slots of the draft, K slots drafted under a setting (<= N), V vocabulary, H hidden size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..acceptance import AcceptanceStats, RowAcceptance
from ..anchors import Anchors, draft_hidden_at_anchors, every_anchor, slot_targets
from ..modeling_dspark import DSparkDraftModel, ProcessorTokenChooser, extract_target_features
from ..verify import accept_prefix, acceptance_probability
from .progress import progress_bar

REPLAY = "loop replay (T=0): exactly the rounds the speculative loop takes on these greedy continuations"
EXPECTATION = (
    "teacher-forced expectation (T>0): expected tokens per round over all anchors, each slot kept with probability "
    "sum_x min(p, q); an expectation, not a replay of the loop"
)


# ----------------------------------------------------------------------------------------------------------------
# What is measured: drafting settings, sequences, per-sequence scores
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DraftingSetting:
    """How a draft proposes in a round.

    max_draft_tokens: K, propose at most K tokens (None: all of the draft's `num_draft_tokens`).
    confidence_threshold: stop a block at the first slot whose confidence falls below it (None: the draft's config,
    as at inference; 0: never stop early).
    """

    max_draft_tokens: int | None = None
    confidence_threshold: float | None = None

    def label(self) -> str:
        tokens = "all" if self.max_draft_tokens is None else str(self.max_draft_tokens)
        threshold = "config" if self.confidence_threshold is None else f"{self.confidence_threshold:g}"
        return f"K={tokens},c={threshold}"

    def slots(self, draft: DSparkDraftModel) -> int:
        count = draft.config.num_draft_tokens
        return count if self.max_draft_tokens is None else min(self.max_draft_tokens, count)


def drafting_settings(
    max_draft_tokens: int | None | Sequence[int | None] = None,
    confidence_threshold: float | None | Sequence[float | None] = None,
) -> list[DraftingSetting]:
    """Every combination of the given K values and thresholds (a scalar is a list of one)."""
    tokens = list(max_draft_tokens) if isinstance(max_draft_tokens, list | tuple) else [max_draft_tokens]
    thresholds = (
        list(confidence_threshold) if isinstance(confidence_threshold, list | tuple) else [confidence_threshold]
    )
    for value in tokens:
        if value is not None and value < 1:
            raise ValueError(f"dspark: max_draft_tokens={value} must be >= 1 (or None for the whole block).")
    for value in thresholds:
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"dspark: confidence_threshold={value} must lie in [0, 1] (or None for the config).")
    return [DraftingSetting(k, c) for k in tokens for c in thresholds]


@dataclass
class EvaluatedSequence:
    """A sequence as evaluated: prompt_length prompt tokens, then response_length continuation tokens."""

    id: str
    domain: str
    prompt_length: int
    response_length: int


@dataclass
class SequenceScore:
    """One arm (draft + setting) on one sequence; the cluster of the paired bootstrap.

    tokens / rounds is the sequence's acceptance length (bonus included). At T=0: tokens emitted by the replayed
    rounds (after the prefill's first token) and the number of rounds. At T>0: the sum over anchors of the expected
    tokens per round, and the number of anchors.
    position_attempts / position_accepts [K]: rounds that reached slot k / kept it (expected counts at T>0).
    length_histogram [K + 1]: rounds with acceptance length k + 1 (expected counts at T>0).
    proposed_histogram [K]: rounds whose draft proposed k + 1 tokens (the confidence stop's draft lengths).
    """

    tokens: float
    rounds: float
    position_attempts: list[float]
    position_accepts: list[float]
    length_histogram: list[float]
    proposed_histogram: list[int]
    drafted: int = 0
    accepted: float = 0.0
    acceptance_lengths: list[int] | None = None  # T=0: each replayed round's emitted tokens, in order
    full_block_length_sum: float = 0.0  # T=0: sum of accepted + 1 over anchors whose block lies in the continuation
    full_block_anchors: int = 0


@dataclass
class ArmResult:
    """One draft under one drafting setting, on every sequence of an `OfflineResult` (same order)."""

    name: str
    draft: str
    setting: DraftingSetting
    num_slots: int
    temperature: float
    sequences: list[EvaluatedSequence]
    scores: list[SequenceScore] = field(default_factory=list)

    @property
    def measure(self) -> str:
        return REPLAY if self.temperature == 0 else EXPECTATION

    def _chosen(self, domain: str | None) -> list[SequenceScore]:
        return [s for s, seq in zip(self.scores, self.sequences) if domain is None or seq.domain == domain]

    def cluster_sums(self, domain: str | None = None) -> tuple[list[float], list[float]]:
        """Per-sequence (tokens, rounds) of the sequences in `domain` (all when None), for the paired bootstrap."""
        chosen = self._chosen(domain)
        return [s.tokens for s in chosen], [s.rounds for s in chosen]

    def replay_stats(self, domain: str | None = None) -> AcceptanceStats:
        """T=0: the replayed rounds as the loop's own `AcceptanceStats` (one row per sequence)."""
        if self.temperature != 0:
            raise ValueError("dspark: there is no loop replay at T>0; offline acceptance there is an expectation.")
        stats = AcceptanceStats(num_slots=self.num_slots)
        for score in self._chosen(domain):
            stats.rows.append(RowAcceptance(list(score.acceptance_lengths), score.drafted, int(score.accepted)))
            stats.position_attempts = [a + int(b) for a, b in zip(stats.position_attempts, score.position_attempts)]
            stats.position_accepts = [a + int(b) for a, b in zip(stats.position_accepts, score.position_accepts)]
        return stats

    def summary(self, domain: str | None = None) -> dict:
        """Acceptance of the sequences in `domain` (all when None). Keys as in `AcceptanceStats.summary`, plus
        `acceptance_length` (the ratio of sums the paired comparison uses), the draft-length histogram and, at T=0,
        the every-anchor average."""
        chosen = self._chosen(domain)
        tokens, rounds = sum(s.tokens for s in chosen), sum(s.rounds for s in chosen)
        attempts = [sum(s.position_attempts[k] for s in chosen) for k in range(self.num_slots)]
        accepts = [sum(s.position_accepts[k] for s in chosen) for k in range(self.num_slots)]
        histogram = [sum(s.length_histogram[k] for s in chosen) for k in range(self.num_slots + 1)]
        proposed = [sum(s.proposed_histogram[k] for s in chosen) for k in range(self.num_slots)]
        result = {
            "measure": self.measure,
            "sequences": len(chosen),
            "acceptance_length": tokens / rounds if rounds else None,
            "rounds" if self.temperature == 0 else "anchors": int(rounds),
            "per_position_acceptance": [a / n if n else None for a, n in zip(accepts, attempts)],
            "acceptance_length_histogram": [int(c) for c in histogram] if self.temperature == 0 else histogram,
            "proposed_length_histogram": proposed,
            "mean_proposed_length": sum((k + 1) * c for k, c in enumerate(proposed)) / sum(proposed)
            if sum(proposed)
            else None,
        }
        if self.temperature == 0:
            anchors = sum(s.full_block_anchors for s in chosen)
            result["tokens"] = int(tokens)
            result["drafted"] = sum(s.drafted for s in chosen)
            result["accepted"] = int(sum(s.accepted for s in chosen))
            result["every_anchor_length"] = sum(s.full_block_length_sum for s in chosen) / anchors if anchors else None
            result["every_anchor_count"] = anchors
        return result

    def per_sequence(self) -> list[dict]:
        """One entry per sequence: its id, domain, lengths and acceptance (T=0: every replayed round)."""
        rows = []
        for sequence, score in zip(self.sequences, self.scores):
            row = {
                "id": sequence.id,
                "domain": sequence.domain,
                "prompt_length": sequence.prompt_length,
                "response_length": sequence.response_length,
                "acceptance_length": score.tokens / score.rounds if score.rounds else None,
                "tokens": score.tokens,
                "rounds" if self.temperature == 0 else "anchors": score.rounds,
            }
            if self.temperature == 0:
                row["acceptance_lengths"] = score.acceptance_lengths
                row["every_anchor_length"] = (
                    score.full_block_length_sum / score.full_block_anchors if score.full_block_anchors else None
                )
            rows.append(row)
        return rows


@dataclass
class OfflineResult:
    """All arms (draft x drafting setting) on the same sequences at one temperature.

    continuation_agreement (T=0): how many response tokens equal the target's argmax after their prefix in this very
    forward; below 1 the continuations are not (or no longer, in this dtype) the target's greedy output and the replay
    is not exactly what the loop would do.
    """

    temperature: float
    sequences: list[EvaluatedSequence]
    arms: dict[str, ArmResult]
    continuation_agreement: dict | None = None

    @property
    def measure(self) -> str:
        return REPLAY if self.temperature == 0 else EXPECTATION

    def __getitem__(self, arm: str) -> ArmResult:
        return self.arms[arm]

    def domains(self) -> list[str]:
        return sorted({sequence.domain for sequence in self.sequences})

    def summary(self) -> dict:
        """{arm: {"all": summary, domain: summary, ...}}."""
        return {
            name: {"all": arm.summary(), **{domain: arm.summary(domain) for domain in self.domains()}}
            for name, arm in self.arms.items()
        }

    def to_dict(self, per_sequence: bool = True) -> dict:
        """JSON-ready: measure, sequences, agreement, and per arm its setting, summaries and per-sequence rows."""
        summaries = self.summary()
        arms = {}
        for name, arm in self.arms.items():
            arms[name] = {
                "draft": arm.draft,
                "max_draft_tokens": arm.setting.max_draft_tokens,
                "confidence_threshold": arm.setting.confidence_threshold,
                "num_slots": arm.num_slots,
                "summary": summaries[name],
            }
            if per_sequence:
                arms[name]["per_sequence"] = arm.per_sequence()
        return {
            "temperature": self.temperature,
            "measure": self.measure,
            "sequences": len(self.sequences),
            "domains": {domain: sum(s.domain == domain for s in self.sequences) for domain in self.domains()},
            "continuation_agreement": self.continuation_agreement,
            "arms": arms,
        }


def arm_names(drafts: dict[str, DSparkDraftModel], settings: list[DraftingSetting]) -> dict[tuple[str, int], str]:
    """(draft name, setting index) -> arm name: the draft's name alone, or `name@K=..,c=..` in a sweep."""
    if len(settings) == 1:
        return {(name, 0): name for name in drafts}
    return {(name, i): f"{name}@{setting.label()}" for name in drafts for i, setting in enumerate(settings)}


# ----------------------------------------------------------------------------------------------------------------
# The target side: one forward per batch of sequences
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SequenceBatch:
    """Right-padded sequences: input_ids, attention_mask, response_mask (True on continuation tokens), all [B, L]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_lengths: list[int]
    lengths: list[int]


def collate_sequences(records: list[dict], device: torch.device) -> SequenceBatch:
    """Right padding keeps every real position's causal context unchanged, so features need no position shift."""
    length = max(len(r["input_ids"]) for r in records)
    input_ids = torch.zeros(len(records), length, dtype=torch.long)
    attention_mask = torch.zeros(len(records), length, dtype=torch.long)
    response_mask = torch.zeros(len(records), length, dtype=torch.bool)
    for row, record in enumerate(records):
        ids = record["input_ids"]
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        response_mask[row, record["prompt_length"] : len(ids)] = True
    return SequenceBatch(
        input_ids.to(device),
        attention_mask.to(device),
        response_mask.to(device),
        [r["prompt_length"] for r in records],
        [len(r["input_ids"]) for r in records],
    )


def target_logits(target, final_hidden: torch.Tensor) -> torch.Tensor:
    """[..., H] final (post-norm) hidden states -> [..., V] float32 next-token logits through the target's lm_head.

    Computed only where needed, chunk by chunk, instead of materialising [B, L, V] for a 150k vocabulary.
    """
    head = target.get_output_embeddings()
    logits = head(final_hidden.to(head.weight.dtype)).float()
    softcap = getattr(target.config.get_text_config(), "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def greedy_agreement(target, final_hidden: torch.Tensor, batch: SequenceBatch, chunk: int) -> tuple[int, int]:
    """(matching, total) response tokens equal to the target's argmax after their prefix."""
    matching = total = 0
    for row, (prompt_length, length) in enumerate(zip(batch.prompt_lengths, batch.lengths)):
        for start in range(prompt_length - 1, length - 1, chunk):
            stop = min(start + chunk, length - 1)
            predicted = target_logits(target, final_hidden[row, start:stop]).argmax(dim=-1)
            matching += int((predicted == batch.input_ids[row, start + 1 : stop + 1]).sum())
            total += stop - start
    return matching, total


# ----------------------------------------------------------------------------------------------------------------
# The draft side: every anchor's block, chunk by chunk
# ----------------------------------------------------------------------------------------------------------------


class TeacherForcedChooser:
    """A `draft_block` chooser that 'chooses' the data tokens, so the Markov head sees the data token as x_{k-1},
    and reports logits / temperature as the q it would sample from."""

    def __init__(self, labels: torch.Tensor, temperature: float):
        self.labels = labels  # [M, K]
        self.temperature = temperature
        self.slot = 0

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.labels[:, self.slot]
        self.slot += 1
        return logits / self.temperature, tokens


@dataclass
class AnchorOutcomes:
    """Per anchor of a batch (flattened, M): its row, position, proposed length, and per temperature:
    T=0: accepted (drafted tokens equal to the continuation, a prefix) and known (slots inside the continuation);
    T>0: alpha [M, K] keep probabilities and usable [M, K] (the slot was proposed and lies inside the continuation;
    alpha is 0 elsewhere)."""

    rows: torch.Tensor
    positions: torch.Tensor
    proposed: torch.Tensor
    accepted: torch.Tensor | None = None
    known: torch.Tensor | None = None
    alpha: torch.Tensor | None = None
    usable: torch.Tensor | None = None

    @staticmethod
    def concatenate(parts: list[AnchorOutcomes]) -> AnchorOutcomes:
        def cat(name: str):
            values = [getattr(part, name) for part in parts]
            return None if values[0] is None else torch.cat(values)

        return AnchorOutcomes(
            *(cat(name) for name in ("rows", "positions", "proposed", "accepted", "known", "alpha", "usable"))
        )


def anchor_chunks(anchors: Anchors, per_row: int):
    """Consecutive slices of at most `per_row` anchors per row (bounds the draft forward and the [M, K, V] logits)."""
    for start in range(0, anchors.count, per_row):
        part = Anchors(anchors.positions[:, start : start + per_row], anchors.valid[:, start : start + per_row])
        if bool(part.valid.any()):
            yield part


def score_chunk(
    draft: DSparkDraftModel,
    target,
    hidden: torch.Tensor,
    final_hidden: torch.Tensor,
    batch: SequenceBatch,
    part: Anchors,
    setting: DraftingSetting,
    temperature: float,
) -> AnchorOutcomes:
    """Draft (T=0) or teacher-force (T>0) the blocks of one chunk of anchors under one setting.

    hidden: [B, a, N, H] drafting-slot states of the chunk's blocks; final_hidden: [B, L, H_t] the target's.
    """
    rows, columns = part.valid.nonzero(as_tuple=True)
    positions = part.positions[rows, columns]
    block_hidden = hidden[rows, columns]  # [M, N, H]
    anchor_ids = batch.input_ids[rows, positions]
    count = setting.slots(draft)
    slots = slot_targets(batch.input_ids, batch.response_mask, part, count)
    labels, known = slots.labels[rows, columns], slots.valid[rows, columns]  # [M, K]
    offsets = torch.arange(count, device=labels.device)
    if temperature == 0:
        chooser = ProcessorTokenChooser(anchor_ids[:, None], None, do_sample=False)
    else:
        chooser = TeacherForcedChooser(labels, temperature)
    block = draft.draft_block(
        block_hidden,
        anchor_ids,
        chooser,
        max_tokens=count,
        confidence_threshold=setting.confidence_threshold,
    )
    drafted = block.tokens.shape[1]  # < count when every block stopped early
    offered = offsets[None] < block.lengths[:, None]
    outcome = AnchorOutcomes(rows=rows, positions=positions, proposed=block.lengths)
    if temperature == 0:
        tokens = torch.full_like(labels, -1)
        tokens[:, :drafted] = block.tokens
        outcome.accepted = accept_prefix((tokens == labels) & known & offered)
        outcome.known = known.sum(dim=1)
    else:
        where = slots.target_positions[rows, columns][:, :drafted]  # [M, K'] positions a + j
        p_logits = target_logits(target, final_hidden[rows[:, None], where]) / temperature
        alpha = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
        alpha[:, :drafted] = acceptance_probability(p_logits, block.q_logits)
        outcome.usable = known & offered
        outcome.alpha = alpha * outcome.usable
    return outcome


# ----------------------------------------------------------------------------------------------------------------
# From anchors to per-sequence scores
# ----------------------------------------------------------------------------------------------------------------


def replay_sequence(
    accepted: dict[int, int],
    proposed: dict[int, int],
    known: dict[int, int],
    prompt_length: int,
    generated_limit: int,
    num_slots: int,
) -> SequenceScore:
    """T=0: walk the rounds the loop takes on this continuation and record them as the loop records its own.

    accepted / proposed / known: per anchor position. The loop's first token comes from the prefill; a round at
    anchor a emits accepted + 1 tokens, cut where the continuation (or the budget) ends, as the loop cuts at its stop
    token or token budget. `generated_limit` is that end, counted in generated tokens.
    """
    stats = AcceptanceStats(num_slots=num_slots)
    proposed_histogram = [0] * num_slots
    generated, anchor = 1, prompt_length
    while generated < generated_limit:
        kept, offered = accepted[anchor], proposed[anchor]
        emitted = min(kept + 1, generated_limit - generated)
        stats.record(torch.tensor([kept]), torch.tensor([offered]), torch.tensor([True]), [emitted])
        proposed_histogram[offered - 1] += 1
        generated += emitted
        anchor += kept + 1
    full_blocks = [position for position, count in known.items() if count == num_slots]
    row = stats.rows[0] if stats.rows else RowAcceptance()
    return SequenceScore(
        tokens=float(sum(row.acceptance_lengths)),
        rounds=float(len(row.acceptance_lengths)),
        position_attempts=[float(v) for v in stats.position_attempts],
        position_accepts=[float(v) for v in stats.position_accepts],
        length_histogram=[float(v) for v in stats.histogram()],
        proposed_histogram=proposed_histogram,
        drafted=row.drafted,
        accepted=float(row.accepted),
        acceptance_lengths=list(row.acceptance_lengths),
        full_block_length_sum=float(sum(accepted[p] + 1 for p in full_blocks)),
        full_block_anchors=len(full_blocks),
    )


def expected_sequence_score(
    alpha: torch.Tensor, usable: torch.Tensor, proposed: torch.Tensor, num_slots: int
) -> SequenceScore:
    """T>0: expected counts over the anchors of one sequence. alpha: [M, K] keep probabilities, 0 where a slot is not
    usable (not proposed, or outside the continuation); usable: [M, K]; proposed: [M]."""
    survival = torch.cat([alpha.new_ones(alpha.shape[0], 1), alpha.double().cumprod(dim=1)], dim=1)  # [M, K + 1]
    reached = survival[:, :-1] * usable  # a slot is attempted when its prefix survived and it was offered
    histogram = survival[:, :-1] - survival[:, 1:]  # P(exactly k kept), k < K
    histogram = torch.cat([histogram, survival[:, -1:]], dim=1)
    proposed_histogram = torch.bincount(proposed - 1, minlength=num_slots)[:num_slots]
    expected = survival[:, 1:].sum(dim=1) + 1.0
    return SequenceScore(
        tokens=float(expected.sum()),
        rounds=float(alpha.shape[0]),
        position_attempts=reached.sum(dim=0).tolist(),
        position_accepts=survival[:, 1:].sum(dim=0).tolist(),
        length_histogram=histogram.sum(dim=0).tolist(),
        proposed_histogram=proposed_histogram.tolist(),
        drafted=int(proposed.sum()),
        accepted=float(expected.sum() - alpha.shape[0]),
    )


def sequence_score(
    outcomes: AnchorOutcomes,
    row: int,
    prompt_length: int,
    generated_limit: int,
    num_slots: int,
    temperature: float,
) -> SequenceScore:
    chosen = outcomes.rows == row
    if temperature > 0:
        return expected_sequence_score(
            outcomes.alpha[chosen].cpu(), outcomes.usable[chosen].cpu(), outcomes.proposed[chosen].cpu(), num_slots
        )
    positions = outcomes.positions[chosen].tolist()
    return replay_sequence(
        dict(zip(positions, outcomes.accepted[chosen].tolist())),
        dict(zip(positions, outcomes.proposed[chosen].tolist())),
        dict(zip(positions, outcomes.known[chosen].tolist())),
        prompt_length,
        generated_limit,
        num_slots,
    )


# ----------------------------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------------------------


def _check_inputs(target, drafts: dict[str, DSparkDraftModel], sequences: list[dict], temperature: float) -> None:
    if not drafts:
        raise ValueError("dspark: offline_acceptance needs at least one draft.")
    if not sequences:
        raise ValueError("dspark: offline_acceptance needs at least one sequence.")
    if temperature < 0:
        raise ValueError(f"dspark: temperature={temperature} must be >= 0 (0 = greedy).")
    for index, record in enumerate(sequences):
        prompt_length, length = record.get("prompt_length"), len(record.get("input_ids") or [])
        if not isinstance(prompt_length, int) or not 0 < prompt_length < length:
            raise ValueError(
                f"dspark: sequence {record.get('id', index)!r} needs input_ids (prompt + continuation) and a "
                f"prompt_length between 1 and len(input_ids) - 1 (got {prompt_length} for {length} tokens)."
            )
    for name, draft in drafts.items():
        try:
            draft.check_target(target, allow_stateful=True)
        except ValueError as error:
            raise ValueError(f"dspark: draft {name!r} does not fit the target: {error}") from None
        if draft.target is not target:
            draft.bind_target(target, allow_stateful=True)


@torch.no_grad()
def offline_acceptance(
    target,
    drafts: dict[str, DSparkDraftModel],
    sequences: list[dict],
    *,
    temperature: float = 0.0,
    max_draft_tokens: int | None | Sequence[int | None] = None,
    confidence_threshold: float | None | Sequence[float | None] = None,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    anchor_chunk: int = 128,
    attention: str = "auto",
    progress: bool = False,
) -> OfflineResult:
    """Acceptance of every draft, under every drafting setting, on the same `sequences` and anchors.

    sequences: records {input_ids (prompt + continuation), prompt_length, id?, domain?} as written by
        `dspark.train.responses.generate_responses`; at temperature 0 they must be the target's greedy
        continuations (the result's `continuation_agreement` checks it).
    max_draft_tokens, confidence_threshold: a value or a list of values (a sweep: every combination becomes an arm
        named `draft@K=..,c=..`); None = the draft's whole block / its configured threshold, as the loop does.
    max_new_tokens: the loop's token budget for the replay (None: the whole continuation); continuations longer than
        the budget let the replay count acceptance beyond it exactly as the loop does.
    batch_size: sequences per target forward; anchor_chunk: anchors per draft forward (bounds the [M, K, V] logits);
    attention: how the packed blocks attend (`auto`, `dense`, `flex`; see `dspark.anchors`).
    """
    _check_inputs(target, drafts, sequences, temperature)
    settings = drafting_settings(max_draft_tokens, confidence_threshold)
    # the training loop calls this mid-training: score in eval mode, then hand the modules back as they were
    modes = [(module, module.training) for module in [*drafts.values(), target]]
    for module, _ in modes:
        module.eval()
    try:
        return _score_all(
            target,
            drafts,
            sequences,
            settings,
            temperature,
            max_new_tokens,
            batch_size,
            anchor_chunk,
            attention,
            progress,
        )
    finally:
        for module, was_training in modes:
            module.train(was_training)


def _score_all(
    target,
    drafts: dict[str, DSparkDraftModel],
    sequences: list[dict],
    settings: list[DraftingSetting],
    temperature: float,
    max_new_tokens: int | None,
    batch_size: int,
    anchor_chunk: int,
    attention: str,
    progress: bool,
) -> OfflineResult:
    """The body of `offline_acceptance` (arguments as there, settings expanded)."""
    names = arm_names(drafts, settings)
    evaluated = [
        EvaluatedSequence(
            id=str(record.get("id", index)),
            domain=str(record.get("domain", "unlabelled")),
            prompt_length=record["prompt_length"],
            response_length=len(record["input_ids"]) - record["prompt_length"],
        )
        for index, record in enumerate(sequences)
    ]
    arms = {
        names[(name, i)]: ArmResult(
            names[(name, i)], name, setting, setting.slots(draft), temperature, evaluated, [None] * len(sequences)
        )
        for name, draft in drafts.items()
        for i, setting in enumerate(settings)
    }
    device = next(target.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]["input_ids"]))  # less padding per batch
    matching = total = 0
    bar = progress_bar(len(sequences), f"offline acceptance T={temperature:g}", progress)
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch = collate_sequences([sequences[i] for i in indices], device)
        limits = [
            length - prompt if max_new_tokens is None else min(max_new_tokens, length - prompt)
            for prompt, length in zip(batch.prompt_lengths, batch.lengths)
        ]
        outputs = target.get_decoder()(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True, use_cache=False
        )
        final_hidden = outputs.last_hidden_state
        if temperature == 0:
            found, counted = greedy_agreement(target, final_hidden, batch, chunk=max(anchor_chunk, 64))
            matching, total = matching + found, total + counted
        anchors = every_anchor(batch.response_mask)
        # anchors the loop can reach within the budget: the anchor is generated token number (a - prompt + 1)
        reachable = torch.tensor([prompt + limit - 1 for prompt, limit in zip(batch.prompt_lengths, limits)])
        anchors.valid &= anchors.positions < reachable.to(device)[:, None]
        features_by_layers: dict[tuple[int, ...], torch.Tensor] = {}
        for name, draft in drafts.items():
            layers = tuple(draft.config.target_layer_ids)
            if layers not in features_by_layers:
                features_by_layers[layers] = extract_target_features(outputs.hidden_states, list(layers))
            features = features_by_layers[layers]
            parts: dict[int, list[AnchorOutcomes]] = {i: [] for i in range(len(settings))}
            for part in anchor_chunks(anchors, max(1, anchor_chunk // len(indices))):
                hidden = draft_hidden_at_anchors(draft, features, batch.input_ids, part, attention)
                for i, setting in enumerate(settings):
                    parts[i].append(score_chunk(draft, target, hidden, final_hidden, batch, part, setting, temperature))
            for i in range(len(settings)):
                arm = arms[names[(name, i)]]
                outcomes = AnchorOutcomes.concatenate(parts[i]) if parts[i] else None
                for row, index in enumerate(indices):
                    arm.scores[index] = (
                        sequence_score(
                            outcomes, row, batch.prompt_lengths[row], limits[row], arm.num_slots, temperature
                        )
                        if outcomes is not None
                        else empty_score(arm.num_slots)
                    )
        del outputs, features_by_layers
        bar.update(len(indices))
    bar.close()
    agreement = None
    if temperature == 0:
        agreement = {"matching": matching, "positions": total, "rate": matching / total if total else None}
    return OfflineResult(temperature, evaluated, arms, agreement)


def empty_score(num_slots: int) -> SequenceScore:
    """A batch whose sequences have no anchor (one-token answers): no rounds after the prefill's token."""
    return SequenceScore(0.0, 0.0, [0.0] * num_slots, [0.0] * num_slots, [0.0] * (num_slots + 1), [0] * num_slots, 0)
