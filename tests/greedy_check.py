"""Tie-aware comparison of greedy outputs.

Verifying k tokens in one forward sums in a different order than decoding one token at a time, so two greedy
decodes may legitimately part at a step where the target's top two logits are (nearly) tied.
"""

from __future__ import annotations

import torch

TIE_MARGIN = 1e-4  # relative gap between the top-2 logits below which either choice is correct


def first_divergence(expected: torch.Tensor, actual: torch.Tensor) -> int | None:
    """Index of the first differing token of two [1, T] sequences (None if equal over the common length)."""
    length = min(expected.shape[1], actual.shape[1])
    diff = (expected[0, :length] != actual[0, :length]).nonzero()
    if diff.numel():
        return int(diff[0, 0])
    return None if expected.shape[1] == actual.shape[1] else length


def assert_greedy_equal(target, expected: torch.Tensor, actual: torch.Tensor, prompt_length: int) -> None:
    """Identical outputs, or the first divergence is at a near-tie of the target's top-2 logits."""
    index = first_divergence(expected, actual)
    if index is None:
        return
    assert index >= prompt_length, f"prompt changed at {index}"
    if index >= min(expected.shape[1], actual.shape[1]):
        raise AssertionError(f"lengths differ: {expected.shape[1]} vs {actual.shape[1]}")
    with torch.no_grad():
        logits = target(expected[:, :index]).logits[0, -1].float()
    top2 = logits.topk(2).values
    gap = float((top2[0] - top2[1]) / top2[0].abs().clamp_min(1e-6))
    assert gap < TIE_MARGIN, (
        f"greedy outputs differ at position {index} ({int(expected[0, index])} vs {int(actual[0, index])}) "
        f"and the target's top-2 logits are not tied (relative gap {gap:.2e})"
    )
