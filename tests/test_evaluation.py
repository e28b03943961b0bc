"""Evaluation: offline acceptance replays the real loop exactly; paired cluster-bootstrap intervals are calibrated."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama

from dspark.evaluation.offline import offline_acceptance
from dspark.evaluation.paired import cluster_bootstrap
from dspark.speculative import speculative_generate
from dspark.train.config import TrainConfig
from dspark.train.trainer import Trainer

PROMPT_LENGTH = 5


@pytest.fixture(scope="module")
def target():
    model = tiny_llama(seed=3, vocab_size=64)
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)  # confident next-token distributions: learnable, with long accepted runs
    return model


def greedy_records(target, count: int, new_tokens: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, 63, (count, PROMPT_LENGTH), generator=generator)
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


@pytest.fixture(scope="module", params=[True, False], ids=["dspark-slots", "dflash-slots"])
def trained_draft(request, target, tmp_path_factory):
    """A draft trained briefly on the target's own greedy text, so that acceptance is well above 1."""
    config = TrainConfig(
        data_dir="unused",
        output_dir=str(tmp_path_factory.mktemp("run")),
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
        sample_from_anchor=request.param,
    )
    trainer = Trainer(config, records=greedy_records(target, 64, 30, seed=0), target=target)
    trainer.run()
    return trainer.unwrapped_draft().eval()


def test_offline_acceptance_at_temperature_zero_equals_what_the_loop_observes(target, trained_draft):
    records = greedy_records(target, 6, 28, seed=11)
    result = offline_acceptance(target, {"draft": trained_draft}, records)["draft"]
    per_row = result.chain.summary()["per_row"]
    total_rounds = 0
    for record, offline in zip(records, per_row):
        prompt = torch.tensor([record["input_ids"][:PROMPT_LENGTH]])
        out = speculative_generate(target, trained_draft, prompt, max_new_tokens=28, return_stats=True)
        assert out.generated[0] == record["input_ids"][PROMPT_LENGTH:], "the continuation must be the greedy one"
        assert offline["acceptance_lengths"] == out.stats["per_row"][0]["acceptance_lengths"]
        total_rounds += len(offline["acceptance_lengths"])
    summary = result.summary()
    assert summary["acceptance_length"] > 1.3, "the trained draft must be accepted for the test to mean anything"
    assert summary["rounds"] == total_rounds
    assert {result.summary("chat")["sequences"], result.summary("code")["sequences"]} == {3}
    chat = result.summary("chat")
    assert sum(chat["acceptance_length_histogram"]) == chat["rounds"] and chat["per_position_acceptance"][0] > 0


def test_temperature_one_reports_a_teacher_forced_expectation_between_one_and_the_block(target, trained_draft):
    records = greedy_records(target, 3, 20, seed=5)
    summary = offline_acceptance(target, {"draft": trained_draft}, records, temperature=1.0)["draft"].summary()
    assert 1.0 < summary["acceptance_length"] <= trained_draft.config.num_draft_tokens + 1
    per_position = summary["per_position_acceptance"]
    assert len(per_position) == trained_draft.config.num_draft_tokens and all(0 < p <= 1 for p in per_position)
    assert "teacher-forced" in summary["expectation"]


def synthetic_pair(rng: torch.Generator, sequences: int, effect: float):
    """Per-sequence (tokens, rounds) for drafts A and B; B's per-round acceptance is higher by `effect` on average,
    with a per-sequence difficulty shared by both drafts (the clustering a bootstrap must respect)."""
    rounds = torch.randint(20, 60, (sequences,), generator=rng).double()
    difficulty = 1.5 + 0.8 * torch.rand(sequences, generator=rng, dtype=torch.float64)
    tokens_a = rounds * difficulty + torch.randn(sequences, generator=rng, dtype=torch.float64) * 3
    tokens_b = rounds * (difficulty + effect) + torch.randn(sequences, generator=rng, dtype=torch.float64) * 3
    return tokens_a, rounds, tokens_b, rounds


@pytest.mark.parametrize("effect", [0.0, 0.15])
def test_cluster_bootstrap_intervals_cover_the_true_gain_at_about_the_nominal_rate(effect):
    rng = torch.Generator().manual_seed(0)
    covered = 0
    replications = 150
    # the true gain of the population ratio: E[tokens_b]/E[rounds] - E[tokens_a]/E[rounds] = effect exactly
    for seed in range(replications):
        tokens_a, rounds_a, tokens_b, rounds_b = synthetic_pair(rng, 40, effect)
        result = cluster_bootstrap(tokens_a, rounds_a, tokens_b, rounds_b, replicates=400, seed=seed)
        low, high = result["absolute_gain_ci"]
        covered += low <= effect <= high
    assert 0.88 <= covered / replications <= 0.99


def test_a_clear_effect_is_called_and_an_interval_with_zero_is_said_plainly():
    rng = torch.Generator().manual_seed(1)
    strong = cluster_bootstrap(*synthetic_pair(rng, 60, 0.5))
    assert not strong["includes_zero"] and "better" in strong["verdict"]
    none = cluster_bootstrap(*synthetic_pair(rng, 60, 0.0), seed=3)
    if none["includes_zero"]:
        assert "no significant difference" in none["verdict"]
    with pytest.raises(ValueError, match="same, non-empty set"):
        cluster_bootstrap([1.0], [1.0], [1.0, 2.0], [1.0, 1.0])
