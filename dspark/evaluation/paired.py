"""Paired comparison of two drafts on the same sequences, with cluster-bootstrap confidence intervals.

The acceptance length of a draft over a set of sequences is a ratio of sums (tokens / rounds). Rounds within one
sequence are correlated, so the resampling unit is the sequence (the cluster): each bootstrap replicate draws
sequences with replacement and recomputes both drafts' ratios on the same draw, which keeps the pairing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def ratio_of_sums(numerators: torch.Tensor, denominators: torch.Tensor) -> torch.Tensor:
    """[..., n] -> [...]: sum(numerators) / sum(denominators) along the last dimension."""
    return numerators.sum(-1) / denominators.sum(-1).clamp(min=1e-12)


def cluster_bootstrap(
    tokens_a: Sequence[float],
    rounds_a: Sequence[float],
    tokens_b: Sequence[float],
    rounds_b: Sequence[float],
    replicates: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Compare B against A: absolute gain (B - A) and relative gain (B / A - 1) of the acceptance length.

    Inputs are per-sequence sums for the same sequences in the same order. Returns point estimates, percentile
    confidence intervals and a plain-words verdict that says when an interval includes 0.
    """
    values = [torch.tensor(list(v), dtype=torch.float64) for v in (tokens_a, rounds_a, tokens_b, rounds_b)]
    count = values[0].numel()
    if count == 0 or any(v.numel() != count for v in values):
        raise ValueError("dspark: paired comparison needs the same, non-empty set of sequences for both drafts.")
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, count, (replicates, count), generator=generator)
    a = ratio_of_sums(values[0][draws], values[1][draws])
    b = ratio_of_sums(values[2][draws], values[3][draws])
    point_a, point_b = float(ratio_of_sums(values[0], values[1])), float(ratio_of_sums(values[2], values[3]))
    tail = (1 - confidence) / 2

    def interval(samples: torch.Tensor) -> list[float]:
        return [float(samples.quantile(tail)), float(samples.quantile(1 - tail))]

    absolute, relative = interval(b - a), interval(b / a - 1)
    includes_zero = absolute[0] <= 0 <= absolute[1]
    verdict = (
        f"the {confidence:.0%} interval includes 0: no significant difference on these {count} sequences"
        if includes_zero
        else f"B is {'better' if point_b > point_a else 'worse'} than A ({confidence:.0%} CI excludes 0)"
    )
    return {
        "sequences": count,
        "a": point_a,
        "b": point_b,
        "absolute_gain": point_b - point_a,
        "absolute_gain_ci": absolute,
        "relative_gain": point_b / point_a - 1,
        "relative_gain_ci": relative,
        "includes_zero": includes_zero,
        "verdict": verdict,
        "replicates": replicates,
        "confidence": confidence,
    }
