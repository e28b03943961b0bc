"""DSparkConfig: defaults, round trip through config.json, and validation messages."""

import pytest

from dspark import DSparkConfig

BASE = dict(vocab_size=100, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)


def test_config_round_trips_through_json(tmp_path):
    config = DSparkConfig(
        **BASE,
        block_size=7,
        target_layer_ids=[1, 3],
        mask_token_id=99,
        markov_rank=8,
        markov_head_type="gated",
        enable_confidence_head=True,
        sample_from_anchor=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e5},
    )
    config.save_pretrained(tmp_path)
    loaded = DSparkConfig.from_pretrained(tmp_path)
    for field in (
        "block_size",
        "target_layer_ids",
        "mask_token_id",
        "markov_rank",
        "markov_head_type",
        "enable_confidence_head",
        "sample_from_anchor",
        "rope_parameters",
        "num_draft_tokens",
    ):
        assert getattr(loaded, field) == getattr(config, field), field
    assert loaded.model_type == "dspark"


def test_number_of_drafted_tokens_follows_the_slot_convention():
    assert DSparkConfig(**BASE, block_size=7).num_draft_tokens == 7
    assert DSparkConfig(**BASE, block_size=7, sample_from_anchor=False).num_draft_tokens == 6


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"block_size": 1}, r"block_size=1; a block needs the anchor"),
        ({"target_layer_ids": []}, r"non-empty list"),
        ({"target_layer_ids": [-2]}, r"contains -2"),
        ({"num_key_value_heads": 3}, r"not a multiple of num_key_value_heads=3"),
        ({"markov_rank": -1}, r"markov_rank=-1 must be >= 0"),
        ({"markov_rank": 4, "markov_head_type": "rnn"}, r"markov_head_type='rnn'; choose one of"),
        ({"enable_confidence_head": True}, r"confidence_head_with_markov=True needs a Markov head"),
        ({"confidence_threshold": 0.5}, r"confidence_threshold > 0 needs enable_confidence_head=True"),
        ({"markov_rank": 4, "enable_confidence_head": True, "confidence_stop": "mean"}, r"confidence_stop='mean'"),
        ({"layer_types": ["full_attention", "full_attention"]}, r"layer_types has 2 entries for 1 layers"),
        ({"layer_types": ["sliding_attention"]}, r"sliding_attention layer needs sliding_window"),
        ({"layer_types": ["linear_attention"]}, r"layer_types contains \['linear_attention'\]"),
    ],
)
def test_invalid_fields_are_named_in_the_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        DSparkConfig(**{**BASE, **overrides})
