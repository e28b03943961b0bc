"""Training: the objective equals a per-anchor reference, loss falls, resume is exact, configs and errors behave."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_draft, tiny_llama

from dspark.anchors import sample_anchors
from dspark.convert import export_checkpoint
from dspark.modeling_dspark import extract_target_features
from dspark.train.config import TrainConfig, add_config_arguments, config_from_arguments
from dspark.train.objective import DraftObjective, LossWeights, observe_target
from dspark.train.trainer import Trainer, collate

PROMPT_LENGTH = 6


@pytest.fixture(scope="module")
def peaked_target():
    """A tiny target with confident next-token distributions, so a draft can learn to predict it."""
    target = tiny_llama(seed=3, vocab_size=64)
    with torch.no_grad():
        target.lm_head.weight.mul_(6.0)
    return target


@pytest.fixture(scope="module")
def records(peaked_target):
    """On-policy data: the target's own sampled continuations of random prompts."""
    torch.manual_seed(0)
    prompts = torch.randint(0, 63, (48, PROMPT_LENGTH))
    with torch.no_grad():
        out = peaked_target.generate(prompts, max_new_tokens=24, do_sample=True, temperature=0.7, pad_token_id=0)
    return [
        {"id": f"seq-{i}", "domain": "chat", "input_ids": out[i].tolist(), "prompt_length": PROMPT_LENGTH}
        for i in range(out.shape[0])
    ]


def small_config(tmp_path, **overrides) -> TrainConfig:
    values = dict(
        data_dir="unused",
        output_dir=str(tmp_path / "run"),
        block_size=4,
        markov_rank=8,
        num_anchors=8,
        batch_size=4,
        max_steps=40,
        learning_rate=3e-3,
        eval_every=0,
        log_every=5,
        checkpoint_every=0,
        heldout_fraction=0.15,
        progress=False,
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.parametrize("sample_from_anchor", [True, False])
def test_packed_objective_equals_a_per_anchor_reference(peaked_target, records, sample_from_anchor):
    draft = tiny_draft(
        peaked_target, block_size=4, markov_rank=8, enable_confidence_head=True, sample_from_anchor=sample_from_anchor
    )
    weights = LossWeights(ce=0.3, tv=0.5, confidence=0.7, decay_gamma=2.0)
    batch = collate(records[:3], pad_token_id=0)
    layer_ids = draft.config.target_layer_ids
    view = observe_target(peaked_target, batch.input_ids, batch.attention_mask, layer_ids)
    anchors = sample_anchors(batch.loss_mask, 5, torch.Generator().manual_seed(2))
    with torch.no_grad():
        result = DraftObjective(draft, weights)(
            view.features, view.last_hidden, batch.input_ids, batch.loss_mask, anchors.positions, anchors.valid
        )

        terms = {"ce": [], "tv": [], "confidence": []}
        slot_weights = []
        num_slots = draft.config.num_draft_tokens
        for row in range(3):
            ids = batch.input_ids[row : row + 1]
            full = peaked_target(ids, output_hidden_states=True)
            features = extract_target_features(full.hidden_states, layer_ids)
            for index in range(anchors.count):
                if not anchors.valid[row, index]:
                    continue
                anchor = int(anchors.positions[row, index])
                hidden = draft(draft.embed_block(ids[:, anchor]), features[:, :anchor]).draft_hidden_states[0]
                for slot in range(num_slots):
                    label_position = anchor + 1 + slot
                    if label_position >= ids.shape[1] or not batch.loss_mask[row, label_position]:
                        break  # acceptance is a prefix property: later slots do not count
                    previous = ids[:, anchor + slot]
                    logits = draft.block_logits(hidden[slot : slot + 1])
                    logits = logits + draft.markov_head(previous, hidden[slot : slot + 1]).float()
                    p = torch.softmax(full.logits[0, anchor + slot].float(), -1)
                    q = torch.softmax(logits[0], -1)
                    tv = (p - q).abs().sum()
                    terms["ce"].append(F.cross_entropy(logits, ids[:, label_position]))
                    terms["tv"].append(tv)
                    confidence_logit = draft.confidence_head(
                        hidden[slot : slot + 1], draft.markov_head.markov_w1(previous)
                    )
                    terms["confidence"].append(
                        F.binary_cross_entropy_with_logits(confidence_logit[0], (1 - tv / 2).clamp(0, 1))
                    )
                    slot_weights.append(math.exp(-slot / weights.decay_gamma))
        w = torch.tensor(slot_weights)
        reference = {name: (torch.stack(values) * w).sum() / w.sum() for name, values in terms.items()}
    for name in ("ce", "tv", "confidence"):
        torch.testing.assert_close(getattr(result, name), reference[name], atol=1e-4, rtol=1e-4)
    expected_total = weights.ce * reference["ce"] + weights.tv * reference["tv"]
    expected_total = expected_total + weights.confidence * reference["confidence"]
    torch.testing.assert_close(result.total, expected_total, atol=1e-4, rtol=1e-4)


def test_training_lowers_the_loss_and_beats_the_untrained_draft_on_heldout_sequences(tmp_path, peaked_target, records):
    config = small_config(tmp_path, max_steps=150)
    trainer = Trainer(config, records=records, target=peaked_target)
    before = trainer.evaluate()
    after = trainer.run()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_losses = [line["loss"] for line in lines if line["split"] == "train"]
    assert train_losses[-1] < 0.8 * train_losses[0]
    assert after["loss"] < before["loss"]
    assert after["expected_length"] > before["expected_length"] + 0.15
    assert sum(after["slot_greedy_match"]) > sum(before["slot_greedy_match"])
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    assert (tmp_path / "run" / "learning_curve.png").stat().st_size > 1000


def _parameters(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in trainer.unwrapped_draft().state_dict().items()}


@pytest.mark.parametrize("accumulation", [1, 2])
def test_kill_and_resume_gives_the_same_parameters_as_an_uninterrupted_run(
    tmp_path, peaked_target, records, accumulation
):
    settings = dict(max_steps=9, gradient_accumulation_steps=accumulation, epochs=1.0)
    uninterrupted = Trainer(small_config(tmp_path / "a", **settings), records=records, target=peaked_target)
    uninterrupted.run()

    first = Trainer(small_config(tmp_path / "b", stop_after_steps=4, **settings), records=records, target=peaked_target)
    assert first.run()["stopped_early"]
    resumed = Trainer(small_config(tmp_path / "b", **settings), records=records, target=peaked_target)
    assert resumed.step == 4
    resumed.run()

    expected, actual = _parameters(uninterrupted), _parameters(resumed)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_every_config_field_comes_from_the_file_unless_the_command_line_overrides_it(tmp_path):
    import argparse

    path = tmp_path / "train.yaml"
    path.write_text("data_dir: data/\nblock_size: 6\nlearning_rate: 0.001\nenable_confidence_head: false\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    config = config_from_arguments(parser.parse_args(["--config", str(path), "--block-size", "5"]))
    assert (config.block_size, config.learning_rate, config.enable_confidence_head) == (5, 0.001, False)
    toml = tmp_path / "train.toml"
    toml.write_text('data_dir = "d"\nnum_anchors = 7\n')
    assert config_from_arguments(parser.parse_args(["--config", str(toml)])).num_anchors == 7
    path.write_text("data_dir: d\nlearnig_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown config fields.*learnig_rate"):
        config_from_arguments(parser.parse_args(["--config", str(path)]))
    with pytest.raises(ValueError, match="block_size must be >= 2"):
        config_from_arguments(parser.parse_args(["--data-dir", "d", "--block-size", "1"]))


def test_too_little_data_is_a_clear_error(tmp_path, peaked_target, records):
    with pytest.raises(ValueError, match="only 3 usable training sequences.*fewer than one batch of 4"):
        Trainer(small_config(tmp_path, heldout_fraction=0.0), records=records[:3], target=peaked_target)


def test_prompts_longer_than_max_length_are_an_error_unless_dropped(tmp_path, peaked_target, records):
    long_record = dict(records[0], id="long", input_ids=list(range(40)) * 2, prompt_length=70)
    with pytest.raises(ValueError, match="1 of 49 prompts are at least max_length=64.*--drop-long-prompts"):
        Trainer(small_config(tmp_path, max_length=64), records=[long_record, *records], target=peaked_target)
    trainer = Trainer(
        small_config(tmp_path, max_length=64, drop_long_prompts=True),
        records=[long_record, *records],
        target=peaked_target,
    )
    assert all(r["id"] != "long" for r in trainer.train_records + trainer.heldout_records)


def test_warm_start_from_a_zlab_dflash_checkpoint_keeps_its_backbone_and_adds_fresh_heads(
    tmp_path, peaked_target, records
):
    dflash = tiny_draft(peaked_target, block_size=4, sample_from_anchor=False)
    export_checkpoint(dflash, tmp_path / "zlab", fmt="zlab-dflash")
    config = small_config(tmp_path, init_from=str(tmp_path / "zlab"), sample_from_anchor=False, markov_rank=8)
    trainer = Trainer(config, records=records, target=peaked_target)
    warm = trainer.unwrapped_draft()
    assert warm.markov_head is not None and warm.confidence_head is not None
    for name, value in dflash.state_dict().items():
        torch.testing.assert_close(warm.state_dict()[name], value.float(), msg=name)


def test_a_warm_started_drafts_own_embedding_and_lm_head_stay_frozen(tmp_path, peaked_target, records):
    owning = tiny_draft(peaked_target, block_size=4, markov_rank=8, has_embed_tokens=True, has_lm_head=True)
    export_checkpoint(owning, tmp_path / "owning")
    config = small_config(tmp_path, init_from=str(tmp_path / "owning"), max_steps=2)
    trainer = Trainer(config, records=records, target=peaked_target)
    draft = trainer.unwrapped_draft()
    assert not draft.embed_tokens.weight.requires_grad and not draft.lm_head.weight.requires_grad
    before = {name: value.clone() for name, value in draft.state_dict().items()}
    trainer.run()
    after = draft.state_dict()
    for name in ("embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(after[name], before[name]), name
    assert not torch.equal(after["fc.weight"], before["fc.weight"])


def test_a_draft_for_another_target_cannot_warm_start(tmp_path, peaked_target, records):
    other = tiny_llama(seed=0, vocab_size=128)
    export_checkpoint(tiny_draft(other, block_size=4), tmp_path / "other")
    with pytest.raises(ValueError, match="vocab"):
        Trainer(small_config(tmp_path, init_from=str(tmp_path / "other")), records=records, target=peaked_target)


def test_a_time_budget_shortens_the_run_and_its_schedule_but_still_finishes(tmp_path, peaked_target, records):
    trainer = Trainer(
        small_config(tmp_path, max_steps=100_000, time_budget_minutes=0.01), records=records, target=peaked_target
    )
    trainer.run()
    assert 11 <= trainer.step < 100_000 and trainer.total_steps == trainer.step
    assert trainer.scheduler.get_last_lr()[0] < 0.05 * trainer.config.learning_rate  # the cosine reached its end
    assert (tmp_path / "run" / "final" / "config.json").is_file()
