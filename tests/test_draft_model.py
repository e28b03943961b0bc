"""Model semantics of the DSpark draft, one behaviour per test."""

import pytest
import torch
from tiny_models import tiny_draft, tiny_llama, tiny_qwen3
from transformers import LlamaConfig
from transformers.cache_utils import DynamicCache
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from dspark import DSparkConfig, DSparkDraftModel, extract_target_features
from dspark.modeling_dspark import (
    CapturedFeatures,
    DSparkRotaryEmbedding,
    TargetFeatureTap,
    _sliding_window_mask,
    rope_inverse_frequencies,
    spread_layer_ids,
)


def greedy_chooser(logits):
    return logits, logits.argmax(-1)


def test_layer_ids_read_hf_hidden_states_at_index_plus_one():
    target = tiny_llama(num_layers=4)
    ids = torch.randint(0, 128, (1, 7))
    hidden = target(ids, output_hidden_states=True).hidden_states
    features = extract_target_features(hidden, [-1, 0, 3])
    torch.testing.assert_close(features, torch.cat([hidden[0], hidden[1], hidden[4]], -1))


def test_feature_tap_captures_what_output_hidden_states_returns_including_the_post_norm_last_layer():
    target = tiny_llama(num_layers=4)
    layer_ids = [-1, 1, 3]
    captured = []
    tap = TargetFeatureTap(target, layer_ids, captured.append)
    tap.arm()
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        reference = extract_target_features(target(ids, output_hidden_states=True).hidden_states, layer_ids)
    assert not tap.armed, "the tap must disarm itself after one forward"
    assert len(captured) == 1 and captured[0].start == 0
    torch.testing.assert_close(captured[0].features, reference)
    with torch.no_grad():
        target(ids)
    assert len(captured) == 1, "a disarmed tap records nothing"


def test_captured_features_are_valid_only_for_the_accepted_prefix():
    features = torch.arange(5.0).view(1, 5, 1)
    captured = CapturedFeatures(start=3, token_ids=torch.tensor([[7, 8, 9, 10, 11]]), features=features)
    sequence = torch.tensor([[1, 2, 3, 7, 8, 99, 5]])  # token 9 was rejected and replaced by 99
    torch.testing.assert_close(captured.take(3, 5, sequence), features[:, :2])
    assert captured.take(3, 6, sequence) is None
    assert captured.take(2, 5, sequence) is None, "positions before the capture are not covered"


def test_block_uses_the_targets_embedding_and_lm_head_unless_the_checkpoint_ships_its_own():
    target = tiny_llama()
    borrowed = tiny_draft(target)
    assert not any(k.startswith(("embed_tokens", "lm_head")) for k in borrowed.state_dict())
    assert borrowed.input_embeddings() is target.get_input_embeddings()
    assert borrowed.output_head() is target.get_output_embeddings()
    anchors = torch.tensor([5, 9])
    block = borrowed.embed_block(anchors)
    expected_ids = torch.tensor([[5] + [borrowed.config.mask_token_id] * 3, [9] + [borrowed.config.mask_token_id] * 3])
    torch.testing.assert_close(block, target.get_input_embeddings()(expected_ids))

    owning = tiny_draft(target, has_embed_tokens=True, has_lm_head=True)
    assert owning.input_embeddings() is owning.embed_tokens
    assert owning.output_head() is owning.lm_head
    assert {"embed_tokens.weight", "lm_head.weight"} <= set(owning.state_dict())


@pytest.mark.parametrize("sample_from_anchor", [True, False])
def test_slot_convention_decides_which_slots_draft(sample_from_anchor):
    target = tiny_llama()
    draft = tiny_draft(target, block_size=5, sample_from_anchor=sample_from_anchor)
    block = draft.embed_block(torch.tensor([3]))
    context = torch.randn(1, 4, draft.fc.in_features)
    out = draft(block, context)
    expected = 5 if sample_from_anchor else 4
    assert draft.config.num_draft_tokens == expected
    assert out.draft_hidden_states.shape[1] == expected
    # transformers' DFlash path reads last_hidden_state[:, 1:] as the drafting slots, in either convention
    torch.testing.assert_close(out.last_hidden_state[:, 1:], out.draft_hidden_states)
    full = draft(block, context, position_ids=torch.arange(9)[None])
    if not sample_from_anchor:
        torch.testing.assert_close(full.last_hidden_state, full.last_hidden_state[:, :5])


def test_attention_is_bidirectional_inside_the_block():
    draft = tiny_draft(tiny_llama(), block_size=4)
    context = torch.randn(1, 3, draft.fc.in_features)
    block = torch.randn(1, 4, 64)
    changed = block.clone()
    changed[:, 3] += 1.0
    first = draft(block, context).last_hidden_state
    second = draft(changed, context).last_hidden_state
    assert not torch.allclose(first[:, 1], second[:, 1]), "slot 0 must see the last slot"


def test_drafting_with_a_cache_of_context_chunks_matches_one_forward_over_all_context():
    draft = tiny_draft(tiny_qwen3(), block_size=4, num_hidden_layers=2)
    features = torch.randn(1, 11, draft.fc.in_features)
    block = torch.randn(1, 4, 64)
    one_shot = draft(block, features, position_ids=torch.arange(15)[None]).last_hidden_state

    cache = DynamicCache()
    start = 0
    for end in (5, 8, 11):  # rounds that add 5, 3 and 3 new context positions
        positions = torch.arange(start, end + 4)[None]
        out = draft(block, features[:, start:end], position_ids=positions, cache=cache)
        cache.crop(-4)
        assert cache.get_seq_length() == end
        start = end
    torch.testing.assert_close(out.last_hidden_state, one_shot, rtol=1e-5, atol=1e-5)


def test_a_two_dimensional_key_mask_hides_padded_context():
    draft = tiny_draft(tiny_llama(), block_size=4)
    features = torch.randn(1, 6, draft.fc.in_features)
    block = torch.randn(1, 4, 64)
    positions = torch.arange(10)[None]
    mask = torch.ones(1, 10, dtype=torch.long)
    mask[:, :2] = 0
    masked = draft(block, features, position_ids=positions, attention_mask=mask).last_hidden_state
    unmasked = draft(block, features, position_ids=positions).last_hidden_state
    assert not torch.allclose(masked, unmasked)
    changed = features.clone()
    changed[:, :2] = torch.randn(1, 2, draft.fc.in_features)
    torch.testing.assert_close(
        draft(block, changed, position_ids=positions, attention_mask=mask).last_hidden_state, masked
    )


def test_sliding_window_mask_matches_a_brute_force_reference():
    mask = _sliding_window_mask(slots=3, kv_length=8, window=4, device=torch.device("cpu"))[0, 0]
    for query in range(3):
        query_index = 8 - 3 + query
        for key in range(8):
            assert bool(mask[query, key]) == (query_index - key < 4)


def test_sliding_window_layers_ignore_context_beyond_the_window():
    target = tiny_llama()
    draft = tiny_draft(target, block_size=4, layer_types=["sliding_attention"], sliding_window=6)
    features = torch.randn(1, 10, draft.fc.in_features)
    block = torch.randn(1, 4, 64)
    positions = torch.arange(14)[None]
    reference = draft(block, features, position_ids=positions).last_hidden_state
    changed = features.clone()
    changed[:, :4] = torch.randn(1, 4, draft.fc.in_features)  # positions 0-3 are >= 6 behind every block query
    torch.testing.assert_close(draft(block, changed, position_ids=positions).last_hidden_state, reference)
    changed[:, 9] += 1.0
    assert not torch.allclose(draft(block, changed, position_ids=positions).last_hidden_state, reference)


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "rope_theta": 500000.0, "factor": 4.0},
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ],
)
def test_rope_frequencies_match_transformers(rope_parameters):
    config = LlamaConfig(
        hidden_size=64, num_attention_heads=4, max_position_embeddings=512, rope_parameters=dict(rope_parameters)
    )
    kind = rope_parameters["rope_type"]
    if kind == "default":  # transformers keeps the default formula inside each model; it is the plain one
        expected, scaling = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16)), 1.0
    else:
        expected, scaling = ROPE_INIT_FUNCTIONS[kind](config, None)
    ours, our_scaling = rope_inverse_frequencies(rope_parameters, 16)
    torch.testing.assert_close(ours, expected.float())
    assert our_scaling == pytest.approx(scaling)


def test_unsupported_rope_type_is_refused_with_the_supported_list():
    config = DSparkConfig(
        vocab_size=100,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0},
    )
    with pytest.raises(ValueError, match=r"rope_type 'yarn' is not supported.*default, linear, llama3"):
        DSparkRotaryEmbedding(config)(torch.arange(3)[None], torch.float32)


def test_markov_step_adds_the_low_rank_bias_of_the_previous_drafted_token():
    target = tiny_llama()
    draft = tiny_draft(target, markov_rank=6)
    hidden = torch.randn(1, 4, 64)
    seen = []

    def chooser(logits):
        seen.append(logits.clone())
        return logits, logits.argmax(-1)

    anchor = torch.tensor([17])
    block = draft.draft_block(hidden, anchor, chooser)
    base = draft.block_logits(hidden)
    previous = torch.cat([anchor, block.tokens[0, :-1]])
    for slot in range(4):
        bias = draft.markov_head.markov_w2(draft.markov_head.markov_w1(previous[slot : slot + 1]))
        torch.testing.assert_close(seen[slot], base[:, slot] + bias)
    torch.testing.assert_close(block.q_logits[0], torch.cat(seen))


def test_gated_markov_head_gates_the_embedding_with_the_hidden_state():
    draft = tiny_draft(tiny_llama(), markov_rank=6, markov_head_type="gated")
    head = draft.markov_head
    previous, hidden = torch.tensor([3, 4]), torch.randn(2, 64)
    embedded = head.markov_w1(previous)
    gate = torch.sigmoid(head.gate_proj(torch.cat([hidden, embedded], -1)))
    torch.testing.assert_close(head(previous, hidden), head.markov_w2(gate * embedded))


def test_fresh_markov_head_is_a_no_op_so_training_starts_from_dflash():
    target = tiny_llama()
    torch.manual_seed(0)
    draft = DSparkDraftModel.from_target(target, markov_rank=6, block_size=4)
    assert torch.count_nonzero(draft.markov_head.markov_w2.weight) == 0
    hidden = torch.randn(1, 4, 64)
    block = draft.draft_block(hidden, torch.tensor([1]), greedy_chooser)
    assert torch.equal(block.tokens, draft.block_logits(hidden).argmax(-1))


@pytest.mark.parametrize("rule", ["position", "survival"])
def test_confidence_head_stops_a_block_at_the_first_slot_under_the_threshold(rule, monkeypatch):
    target = tiny_llama()
    draft = tiny_draft(
        target, markov_rank=4, enable_confidence_head=True, confidence_threshold=0.5, confidence_stop=rule, block_size=6
    )
    per_slot = iter([0.9, 0.8, 0.7, 0.4, 0.9, 0.9])
    monkeypatch.setattr(draft, "slot_confidence", lambda previous, hidden: torch.tensor([next(per_slot)]))
    block = draft.draft_block(torch.randn(1, 6, 64), torch.tensor([1]), greedy_chooser)
    # position: 0.4 at slot 3 is the first below 0.5; survival: 0.9*0.8*0.7 = 0.504 still passes, 0.2 at slot 3 stops.
    assert int(block.lengths[0]) == 3
    assert block.tokens.shape[1] == 3


def test_survival_rule_stops_earlier_than_the_position_rule():
    values = [0.9, 0.7, 0.7, 0.9, 0.9, 0.9]
    lengths = {}
    target = tiny_llama()
    for rule in ("position", "survival"):
        draft = tiny_draft(
            target,
            markov_rank=4,
            enable_confidence_head=True,
            confidence_threshold=0.55,
            confidence_stop=rule,
            block_size=6,
        )
        per_slot = iter(values)
        draft.slot_confidence = lambda previous, hidden, it=per_slot: torch.tensor([next(it)])
        lengths[rule] = int(draft.draft_block(torch.randn(1, 6, 64), torch.tensor([1]), greedy_chooser).lengths[0])
    assert lengths == {"position": 6, "survival": 2}  # survival: 0.9, 0.63, 0.441 < 0.55 at slot 2


def test_confidence_is_the_sigmoid_of_the_head_on_hidden_and_previous_markov_embedding():
    draft = tiny_draft(tiny_llama(), markov_rank=4, enable_confidence_head=True)
    previous, hidden = torch.tensor([5]), torch.randn(1, 64)
    features = torch.cat([hidden, draft.markov_head.markov_w1(previous)], -1)
    expected = torch.sigmoid(draft.confidence_head.proj(features)).squeeze(-1)
    torch.testing.assert_close(draft.slot_confidence(previous, hidden), expected)


def test_from_target_copies_shapes_and_spreads_layer_ids():
    target = tiny_qwen3(num_layers=5)
    draft = DSparkDraftModel.from_target(target, num_hidden_layers=2, block_size=6, num_target_features=3)
    config = draft.config
    assert (config.vocab_size, config.hidden_size, config.head_dim) == (160, 64, 16)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.target_layer_ids == spread_layer_ids(5, 3) == [0, 2, 4]
    assert config.num_target_layers == 5 and config.mask_token_id == 159
    assert config.rope_parameters == target.config.rope_parameters
    assert draft.target is target


def test_spread_layer_ids_matches_the_dflash_choice_for_a_36_layer_target():
    assert spread_layer_ids(36, 5) == [1, 9, 17, 25, 33]
    assert spread_layer_ids(30, 1) == [14]
