"""Paired comparison of two drafts on the same sequences, with cluster-bootstrap confidence intervals.

The acceptance length of a draft over a set of sequences is a ratio of sums (tokens / rounds). Rounds within one
sequence are correlated (an easy answer is easy for every draft), so the resampling unit is the sequence (the
cluster): each bootstrap replicate draws sequences with replacement and recomputes both drafts' ratios on the same
draw, which keeps the pairing and lets the shared difficulty cancel in the difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .bootstrap import percentile_interval, ratio_of_sums, resample_indices

if TYPE_CHECKING:
    from .offline import OfflineResult

__all__ = ["cluster_bootstrap", "compare_arms", "ratio_of_sums"]


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

    Inputs are per-sequence sums (tokens emitted, rounds) for the same sequences in the same order. Returns point
    estimates, percentile confidence intervals and a plain-words verdict that says when an interval includes 0.
    """
    values = [torch.tensor([float(v) for v in column], dtype=torch.float64) for column in (tokens_a, rounds_a)]
    values += [torch.tensor([float(v) for v in column], dtype=torch.float64) for column in (tokens_b, rounds_b)]
    count = values[0].numel()
    if count == 0 or any(v.numel() != count for v in values):
        raise ValueError("dspark: paired comparison needs the same, non-empty set of sequences for both drafts.")
    draws = resample_indices(count, replicates, seed)
    a = ratio_of_sums(values[0][draws], values[1][draws])
    b = ratio_of_sums(values[2][draws], values[3][draws])
    point_a, point_b = float(ratio_of_sums(values[0], values[1])), float(ratio_of_sums(values[2], values[3]))
    absolute = percentile_interval(b - a, confidence)
    relative = percentile_interval(b / a.clamp(min=1e-12) - 1, confidence)
    includes_zero = absolute[0] <= 0 <= absolute[1]
    return {
        "sequences": count,
        "a": point_a,
        "b": point_b,
        "absolute_gain": point_b - point_a,
        "absolute_gain_ci": absolute,
        "relative_gain": point_b / point_a - 1 if point_a else None,
        "relative_gain_ci": relative,
        "includes_zero": includes_zero,
        "verdict": verdict(point_a, point_b, relative, includes_zero, confidence, count),
        "replicates": replicates,
        "confidence": confidence,
        "seed": seed,
        "cluster": "sequence",
    }


def verdict(a: float, b: float, relative_ci: list[float], includes_zero: bool, confidence: float, count: int) -> str:
    """One sentence a reader cannot misread."""
    interval = f"{confidence:.0%} CI of the relative gain {relative_ci[0]:+.1%} .. {relative_ci[1]:+.1%}"
    if includes_zero:
        return f"no significant difference: the {interval} includes 0, so these {count} sequences cannot tell B from A"
    return f"B is {'better' if b > a else 'worse'} than A ({b / a - 1:+.1%}; {interval} excludes 0)"


def compare_arms(
    result: OfflineResult,
    a: str,
    b: str,
    *,
    replicates: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Arm B against arm A of one `OfflineResult` (same sequences, same anchors), overall and per domain.

    Returns {"a": name, "b": name, "measure": ..., "all": cluster_bootstrap(...), "<domain>": ...}.
    """
    for name in (a, b):
        if name not in result.arms:
            raise ValueError(f"dspark: no arm {name!r} to compare; the arms are {', '.join(result.arms)}.")
    report = {"a": a, "b": b, "measure": result.measure}
    for domain in [None, *result.domains()]:
        tokens_a, rounds_a = result.arms[a].cluster_sums(domain)
        tokens_b, rounds_b = result.arms[b].cluster_sums(domain)
        report[domain or "all"] = cluster_bootstrap(
            tokens_a, rounds_a, tokens_b, rounds_b, replicates=replicates, confidence=confidence, seed=seed
        )
    return report
