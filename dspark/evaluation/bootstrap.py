"""Bootstrap resampling: seeded draws with replacement, percentile intervals, ratio-of-sums statistics.

Every number we compare is a ratio of sums (tokens / rounds for acceptance length, tokens / seconds for throughput),
and its natural unit of independence is a cluster (a sequence, a prompt batch), not a round. These helpers resample
clusters and recompute the ratio on each draw; `paired` and `bench` build their comparisons on them.
"""

from __future__ import annotations

import torch


def resample_indices(count: int, replicates: int, seed: int) -> torch.Tensor:
    """[replicates, count] indices drawn uniformly with replacement from 0 .. count-1 (CPU generator, reproducible)."""
    if count < 1:
        raise ValueError("dspark: a bootstrap needs at least one cluster to resample.")
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, count, (replicates, count), generator=generator)


def ratio_of_sums(numerators: torch.Tensor, denominators: torch.Tensor) -> torch.Tensor:
    """[..., n] -> [...]: sum(numerators) / sum(denominators) along the last dimension (0 / 0 gives 0)."""
    return numerators.sum(-1) / denominators.sum(-1).clamp(min=1e-12)


def percentile_interval(samples: torch.Tensor, confidence: float) -> list[float]:
    """[R] bootstrap replicates -> [low, high], the central `confidence` percentile interval."""
    tail = (1.0 - confidence) / 2.0
    values = samples.double()
    return [float(values.quantile(tail)), float(values.quantile(1.0 - tail))]


def bootstrap_ratio(
    numerators: torch.Tensor, denominators: torch.Tensor, replicates: int, confidence: float, seed: int
) -> dict:
    """Point estimate and percentile interval of sum(numerators) / sum(denominators), clusters resampled.

    numerators, denominators: [n] per-cluster sums.
    """
    draws = resample_indices(numerators.numel(), replicates, seed)
    samples = ratio_of_sums(numerators.double()[draws], denominators.double()[draws])
    return {
        "estimate": float(ratio_of_sums(numerators.double(), denominators.double())),
        "ci": percentile_interval(samples, confidence),
    }
