"""Offline acceptance: at T=0 it replays the real speculative loop round for round; at T>0 it is the teacher-forced
expectation computed independently here; batching, chunking and sweeps do not change a number."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_draft, tiny_llama

from dspark.evaluation.offline import EXPECTATION, REPLAY, offline_acceptance
from dspark.modeling_dspark import extract_target_features
from dspark.speculative import speculative_generate
from dspark.verify import acceptance_probability

PROMPT_LENGTH = 5
VOCAB = 64
ENCODING = 1024.0  # integers k are stored as k / 1024 in float32 hidden states: exact, and small for the heads


@pytest.fixture(scope="module")
def target():
    model = tiny_llama(seed=3, vocab_size=VOCAB)
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)  # confident next-token distributions: varied, non-degenerate greedy text
    return model


def greedy_records(target, count: int, new_tokens: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, VOCAB - 1, (count, PROMPT_LENGTH), generator=generator).to(target.device)
    with torch.no_grad():
        out = target.generate(prompts, max_new_tokens=new_tokens, do_sample=False)
    return [
        {
            "id": f"s{i}",
            "domain": "code" if i % 2 else "chat",
            "input_ids": out[i].tolist(),
            "prompt_length": PROMPT_LENGTH,
        }
        for i in range(count)
    ]


class ContinuationOracle:
    """Rigs a draft to propose the known continuation, so that acceptance is long and varied, identically in the loop
    (incremental draft cache) and offline (packed blocks).

    The backbone is replaced by a function of what both paths give it alike: the block's anchor token (read back from
    an embedding that encodes ids), the anchor's position and each slot's offset. The output head then peaks on the
    data token the slot predicts, except on a fixed pattern of (anchor, slot) where it is deliberately wrong. The
    Markov and confidence heads run unchanged on these hidden states, so the free-running Markov chain and the
    confidence stop are exercised for real.
    """

    def __init__(self, draft, records: list[dict], peak: float = 5.0):
        self.draft = draft
        self.block_size = draft.config.block_size
        self.first_slot = draft.first_drafting_slot
        self.peak = peak
        self.continuation: dict[tuple[int, int], list[int]] = {}
        for record in records:
            ids = record["input_ids"]
            for position in range(record["prompt_length"], len(ids)):
                self.continuation.setdefault((position, ids[position]), ids[position + 1 :])
        hidden_size = draft.config.hidden_size
        encoder = torch.nn.Embedding(VOCAB, hidden_size)
        with torch.no_grad():
            encoder.weight.zero_()
            encoder.weight[:, 0] = torch.arange(VOCAB) / ENCODING
        draft.embed_tokens = encoder.to(draft.device)
        original = draft.backbone
        draft.backbone = lambda *args, **kwargs: self.backbone(original, *args, **kwargs)
        draft.block_logits = self.block_logits

    def backbone(self, original, noise_embeds, context_hidden_states=None, position_ids=None, *args, **kwargs):
        original(noise_embeds, context_hidden_states, position_ids, *args, **kwargs)  # keeps the draft cache in step
        batch, slots, hidden_size = noise_embeds.shape
        blocks = slots // self.block_size

        def per_block_first(values: torch.Tensor) -> torch.Tensor:
            first = values.reshape(batch, blocks, self.block_size)[:, :, :1]
            return first.expand(-1, -1, self.block_size).reshape(batch, slots)

        positions = position_ids[:, -slots:]
        anchor_positions = per_block_first(positions)
        anchor_tokens = per_block_first((noise_embeds[..., 0].float() * ENCODING).round().long())
        offsets = positions - anchor_positions
        hidden = torch.zeros(batch, slots, hidden_size, device=noise_embeds.device)
        hidden[..., 0] = anchor_positions / ENCODING
        hidden[..., 1] = anchor_tokens / ENCODING
        hidden[..., 2] = offsets / ENCODING
        # varied but deterministic features for the Markov (gated) and confidence heads
        phase = (anchor_positions * 7 + anchor_tokens * 3 + offsets).float()[..., None]
        hidden[..., 3:] = torch.sin(phase * torch.arange(1, hidden_size - 2, device=phase.device).float() * 0.37)
        return hidden

    def block_logits(self, draft_hidden: torch.Tensor) -> torch.Tensor:
        anchors = (draft_hidden[..., 0] * ENCODING).round().long()
        tokens = (draft_hidden[..., 1] * ENCODING).round().long()
        slots = (draft_hidden[..., 2] * ENCODING).round().long() - self.first_slot
        logits = torch.zeros(*draft_hidden.shape[:-1], VOCAB, device=draft_hidden.device)
        for index, (anchor, token, slot) in enumerate(
            zip(anchors.flatten().tolist(), tokens.flatten().tolist(), slots.flatten().tolist())
        ):
            following = self.continuation.get((anchor, token), [])
            truth = following[slot] if 0 <= slot < len(following) else 0
            wrong = (anchor * 5 + slot * 3) % 7 == 0
            logits.view(-1, VOCAB)[index, (truth + 1) % VOCAB if wrong else truth] = self.peak
        return logits


def rigged_draft(target, records, sample_from_anchor: bool, markov: bool, confidence: bool):
    draft = tiny_draft(
        target,
        block_size=5,
        sample_from_anchor=sample_from_anchor,
        markov_rank=8 if markov else 0,
        enable_confidence_head=confidence,
        confidence_threshold=0.45 if confidence else 0.0,
    )
    if markov:
        with torch.no_grad():  # a Markov bias comparable to the peak, so it changes proposals inside the block
            draft.markov_head.markov_w1.weight.normal_(0.0, 0.7)
    ContinuationOracle(draft, records)
    return draft


DRAFT_KINDS = [
    pytest.param(True, True, False, id="dspark-slots-markov"),
    pytest.param(False, True, False, id="dflash-slots-markov"),
    pytest.param(True, True, True, id="dspark-slots-markov-confidence"),
]


@pytest.mark.parametrize("sample_from_anchor, markov, confidence", DRAFT_KINDS)
def test_offline_replay_at_temperature_zero_equals_the_loop_round_for_round(
    target, sample_from_anchor, markov, confidence
):
    budget = 22
    # continuations run past the budget, so the replay knows every drafted token the loop checks in its last round
    records = greedy_records(target, 5, budget + 6, seed=11)
    draft = rigged_draft(target, records, sample_from_anchor, markov, confidence)
    result = offline_acceptance(target, {"rigged": draft}, records, max_new_tokens=budget, batch_size=3, anchor_chunk=7)
    arm = result["rigged"]
    assert result.continuation_agreement["rate"] == 1.0
    loop_rows, lengths = [], []
    for record, offline in zip(records, arm.per_sequence()):
        prompt = torch.tensor([record["input_ids"][:PROMPT_LENGTH]], device=target.device)
        out = speculative_generate(target, draft, prompt, max_new_tokens=budget, return_stats=True)
        assert out.generated[0] == record["input_ids"][PROMPT_LENGTH : PROMPT_LENGTH + budget]
        loop_rows.append(out.stats["per_row"][0])
        assert offline["acceptance_lengths"] == out.stats["per_row"][0]["acceptance_lengths"]
        lengths += offline["acceptance_lengths"]
    replay = arm.replay_stats().summary()
    assert replay["per_row"] == loop_rows  # lengths, drafted and accepted tokens of every round
    summary = arm.summary()
    assert summary["measure"] == REPLAY
    assert summary["acceptance_length"] == pytest.approx(sum(lengths) / len(lengths))
    assert summary["acceptance_length"] > 1.8, "the rig must give long accepted runs for the test to mean anything"
    assert len(set(lengths)) >= 3, "the rig must give varied acceptance lengths"
    assert summary["per_position_acceptance"] == replay["per_position_acceptance"]
    assert summary["acceptance_length_histogram"] == replay["acceptance_length_histogram"]
    assert sum(summary["proposed_length_histogram"]) == summary["rounds"] == len(lengths)
    if confidence:
        assert summary["mean_proposed_length"] < draft.config.num_draft_tokens, "the confidence stop must fire"


def test_replay_to_the_end_of_the_continuation_matches_the_loop_with_the_same_budget(target):
    records = greedy_records(target, 4, 18, seed=2)
    draft = rigged_draft(target, records, True, True, False)
    arm = offline_acceptance(target, {"rigged": draft}, records)["rigged"]
    for record, offline in zip(records, arm.per_sequence()):
        prompt = torch.tensor([record["input_ids"][:PROMPT_LENGTH]])
        out = speculative_generate(target, draft, prompt, max_new_tokens=18, return_stats=True)
        assert offline["acceptance_lengths"] == out.stats["per_row"][0]["acceptance_lengths"]
        assert offline["tokens"] == 17  # every generated token after the prefill's first one


def test_batching_chunking_and_sweeps_do_not_change_a_number(target):
    records = greedy_records(target, 5, 16, seed=4)
    draft = rigged_draft(target, records, True, True, True)
    single = offline_acceptance(target, {"d": draft}, records, batch_size=1, anchor_chunk=1000)
    packed = offline_acceptance(target, {"d": draft}, records, batch_size=5, anchor_chunk=4)
    assert single["d"].per_sequence() == packed["d"].per_sequence()
    sweep = offline_acceptance(
        target, {"d": draft}, records, max_draft_tokens=[2, None], confidence_threshold=[0.0, None]
    )
    assert set(sweep.arms) == {"d@K=2,c=0", "d@K=2,c=config", "d@K=all,c=0", "d@K=all,c=config"}
    assert sweep["d@K=all,c=config"].per_sequence() == single["d"].per_sequence()
    short = sweep["d@K=2,c=0"].summary()
    assert short["acceptance_length_histogram"][3:] == [] and len(short["per_position_acceptance"]) == 2
    assert short["mean_proposed_length"] == 2.0
    by_domain = single.summary()["d"]
    assert by_domain["chat"]["sequences"] + by_domain["code"]["sequences"] == 5
    assert by_domain["chat"]["rounds"] + by_domain["code"]["rounds"] == by_domain["all"]["rounds"]


def test_temperature_above_zero_is_the_teacher_forced_expectation_computed_independently(target):
    draft = tiny_draft(target, block_size=4, markov_rank=8)
    records = greedy_records(target, 3, 12, seed=7)
    temperature = 0.8
    # budget 2: the only reachable anchor is the first response token, so each sequence's number is one anchor's
    result = offline_acceptance(target, {"d": draft}, records, temperature=temperature, max_new_tokens=2)
    arm = result["d"]
    assert arm.summary()["measure"] == EXPECTATION and "expectation" in result.to_dict()["measure"]
    for record, offline in zip(records, arm.per_sequence()):
        ids = torch.tensor([record["input_ids"]])
        with torch.no_grad():
            out = target(ids, output_hidden_states=True)
            context = extract_target_features(out.hidden_states, draft.config.target_layer_ids)[:, :PROMPT_LENGTH]
            anchor = ids[:, PROMPT_LENGTH]
            positions = torch.arange(PROMPT_LENGTH + draft.config.block_size)[None]
            hidden = draft(draft.embed_block(anchor), context, position_ids=positions).draft_hidden_states
            slots = draft.config.num_draft_tokens
            previous = ids[0, PROMPT_LENGTH : PROMPT_LENGTH + slots]
            q = draft.slot_logits(draft.block_logits(hidden)[0], previous, hidden[0])
            p = out.logits[0, PROMPT_LENGTH : PROMPT_LENGTH + slots].float()
        alpha = acceptance_probability(p / temperature, q / temperature)
        expected = 1.0 + alpha.cumprod(0).sum()
        assert offline["anchors"] == 1
        assert offline["tokens"] == pytest.approx(float(expected), rel=1e-4)
    summary = arm.summary()
    assert sum(summary["acceptance_length_histogram"]) == pytest.approx(summary["anchors"])
    assert all(0 <= p <= 1 for p in summary["per_position_acceptance"])


def test_temperature_above_zero_over_whole_sequences_is_consistent(target):
    draft = tiny_draft(target, block_size=4, markov_rank=8, enable_confidence_head=True, confidence_threshold=0.5)
    records = greedy_records(target, 4, 14, seed=8)
    one = offline_acceptance(target, {"d": draft}, records, temperature=1.0, batch_size=1, anchor_chunk=3)
    many = offline_acceptance(target, {"d": draft}, records, temperature=1.0, batch_size=4)
    for a, b in zip(one["d"].per_sequence(), many["d"].per_sequence()):
        assert a["tokens"] == pytest.approx(b["tokens"], rel=1e-4) and a["anchors"] == b["anchors"] == 13
    summary = many["d"].summary()
    assert 1.0 <= summary["acceptance_length"] <= draft.config.num_draft_tokens + 1
    assert sum(summary["proposed_length_histogram"]) == summary["anchors"]


def test_clear_errors_for_bad_inputs(target):
    draft = tiny_draft(target)
    record = {"id": "x", "input_ids": [1, 2, 3], "prompt_length": 3}
    with pytest.raises(ValueError, match="prompt_length between 1"):
        offline_acceptance(target, {"d": draft}, [record])
    other = tiny_llama(seed=0, vocab_size=96)
    with pytest.raises(ValueError, match="draft 'd' does not fit the target: dspark: vocabulary mismatch"):
        offline_acceptance(other, {"d": draft}, [{"input_ids": [1, 2, 3], "prompt_length": 1}])
    with pytest.raises(ValueError, match="max_draft_tokens=0"):
        offline_acceptance(target, {"d": draft}, [{"input_ids": [1, 2, 3], "prompt_length": 1}], max_draft_tokens=0)


@pytest.mark.slow
@pytest.mark.parametrize("sample_from_anchor", [True, False], ids=["dspark-slots", "dflash-slots"])
def test_a_genuinely_trained_draft_is_replayed_exactly_too(target, tmp_path, sample_from_anchor):
    """The same equality with a draft trained for real (no rig): real hidden states, packed vs incremental."""
    from dspark.train.config import TrainConfig
    from dspark.train.trainer import Trainer

    config = TrainConfig(
        data_dir="unused",
        output_dir=str(tmp_path / "run"),
        block_size=4,
        markov_rank=8,
        num_anchors=16,
        batch_size=8,
        max_steps=120,
        learning_rate=3e-3,
        eval_every=0,
        checkpoint_every=0,
        heldout_fraction=0.0,
        progress=False,
        sample_from_anchor=sample_from_anchor,
    )
    trainer = Trainer(config, records=greedy_records(target, 64, 30, seed=0), target=target)
    trainer.run()
    draft = trainer.unwrapped_draft().eval()
    records = greedy_records(target, 6, 28, seed=11)
    arm = offline_acceptance(target, {"trained": draft}, records)["trained"]
    for record, offline in zip(records, arm.per_sequence()):
        prompt = torch.tensor([record["input_ids"][:PROMPT_LENGTH]])
        out = speculative_generate(target, draft, prompt, max_new_tokens=28, return_stats=True)
        assert offline["acceptance_lengths"] == out.stats["per_row"][0]["acceptance_lengths"]
    assert arm.summary()["acceptance_length"] > 1.3, "the trained draft must be accepted for the test to mean anything"
