"""Paired cluster bootstrap: intervals cover a known gain at about the nominal rate, a null effect's interval includes
0 about 95% of the time, the verdict says so in words, and arms of an offline result are compared per domain."""

from __future__ import annotations

import pytest
import torch

from dspark.evaluation.offline import ArmResult, DraftingSetting, EvaluatedSequence, OfflineResult, SequenceScore
from dspark.evaluation.paired import cluster_bootstrap, compare_arms

REPLICATIONS = 200


def synthetic_pair(rng: torch.Generator, sequences: int, effect: float):
    """Per-sequence (tokens, rounds) of drafts A and B. Each sequence has a difficulty shared by both drafts (the
    clustering a bootstrap must respect); B earns `effect` more tokens per round on average, so the population gain
    of the ratio of means is exactly `effect`."""
    rounds = torch.randint(20, 60, (sequences,), generator=rng).double()
    difficulty = 1.5 + 0.8 * torch.rand(sequences, generator=rng, dtype=torch.float64)
    tokens_a = rounds * difficulty + torch.randn(sequences, generator=rng, dtype=torch.float64) * 3
    tokens_b = rounds * (difficulty + effect) + torch.randn(sequences, generator=rng, dtype=torch.float64) * 3
    return tokens_a, rounds, tokens_b, rounds


@pytest.mark.parametrize("effect", [0.0, 0.15], ids=["null", "known-gain"])
def test_cluster_bootstrap_covers_the_true_gain_at_about_the_nominal_rate(effect):
    rng = torch.Generator().manual_seed(0)
    covered = includes_zero = 0
    for replication in range(REPLICATIONS):
        result = cluster_bootstrap(*synthetic_pair(rng, 40, effect), replicates=400, seed=replication)
        low, high = result["absolute_gain_ci"]
        covered += low <= effect <= high
        includes_zero += result["includes_zero"]
    assert 0.88 <= covered / REPLICATIONS <= 0.99
    if effect == 0.0:
        assert 0.88 <= includes_zero / REPLICATIONS <= 0.99  # the null is (correctly) not rejected ~95% of the time
    else:
        assert includes_zero / REPLICATIONS < 0.2  # and a real gain of this size is usually detected


def test_verdicts_are_plain_words_and_inputs_are_checked():
    rng = torch.Generator().manual_seed(1)
    strong = cluster_bootstrap(*synthetic_pair(rng, 60, 0.5))
    assert not strong["includes_zero"] and strong["verdict"].startswith("B is better than A")
    assert strong["relative_gain_ci"][0] > 0 and strong["cluster"] == "sequence"
    worse = cluster_bootstrap(*synthetic_pair(rng, 60, -0.5))
    assert worse["verdict"].startswith("B is worse than A")
    tokens_a, rounds, _, _ = synthetic_pair(rng, 30, 0.0)
    same = cluster_bootstrap(tokens_a, rounds, tokens_a, rounds)
    assert same["includes_zero"] and "no significant difference" in same["verdict"] and "includes 0" in same["verdict"]
    assert cluster_bootstrap(tokens_a, rounds, tokens_a * 1.1, rounds, seed=4) == cluster_bootstrap(
        tokens_a, rounds, tokens_a * 1.1, rounds, seed=4
    ), "seeded: the same inputs give the same interval"
    with pytest.raises(ValueError, match="same, non-empty set"):
        cluster_bootstrap([1.0], [1.0], [1.0, 2.0], [1.0, 1.0])


def scores(pairs: list[tuple[float, float]]) -> list[SequenceScore]:
    return [SequenceScore(tokens, rounds, [0.0], [0.0], [0.0, 0.0], [0]) for tokens, rounds in pairs]


def test_compare_arms_pairs_the_same_sequences_per_domain():
    sequences = [EvaluatedSequence(f"s{i}", "code" if i % 2 else "chat", 5, 20) for i in range(40)]
    rng = torch.Generator().manual_seed(2)
    tokens_a, rounds, tokens_b, _ = synthetic_pair(rng, 40, 0.4)
    arms = {
        name: ArmResult(name, name, DraftingSetting(), 1, 0.0, sequences, scores(list(zip(tokens, rounds.tolist()))))
        for name, tokens in (("a", tokens_a.tolist()), ("b", tokens_b.tolist()))
    }
    result = OfflineResult(0.0, sequences, arms)
    report = compare_arms(result, "a", "b", replicates=300, seed=1)
    assert set(report) == {"a", "b", "measure", "all", "chat", "code"} and "replay" in report["measure"]
    assert report["all"]["sequences"] == 40 and report["chat"]["sequences"] == report["code"]["sequences"] == 20
    chat = [i for i in range(40) if i % 2 == 0]
    expected = float(tokens_b[chat].sum() / rounds[chat].sum() - tokens_a[chat].sum() / rounds[chat].sum())
    assert report["chat"]["absolute_gain"] == pytest.approx(expected)
    assert not report["all"]["includes_zero"]
    with pytest.raises(ValueError, match="no arm 'c'"):
        compare_arms(result, "a", "c")
