"""Acceptance bookkeeping shared by the speculative loop and evaluation.

Acceptance length counts the bonus token: a round that keeps a drafted tokens emits a + 1 tokens (fewer only when a
stop token or the token budget cuts the round short; the recorded length is what was actually emitted).
Per-position conditional acceptance at slot k = P(slot k kept | slots < k kept and slot k proposed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RowAcceptance:
    acceptance_lengths: list[int] = field(default_factory=list)
    drafted: int = 0
    accepted: int = 0


@dataclass
class AcceptanceStats:
    """Per-row and per-position acceptance counts over the rounds of a generation (or of an evaluation)."""

    num_slots: int
    rows: list[RowAcceptance] = field(default_factory=list)
    position_attempts: list[int] = field(default_factory=list)
    position_accepts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.position_attempts = self.position_attempts or [0] * self.num_slots
        self.position_accepts = self.position_accepts or [0] * self.num_slots

    def record(
        self,
        accepted: torch.Tensor,
        proposed: torch.Tensor,
        active: torch.Tensor,
        emitted: list[int] | None = None,
    ) -> None:
        """One round: accepted [B] kept tokens, proposed [B] drafted tokens, active [B] rows that took part,
        emitted: tokens each row actually emitted (default accepted + 1)."""
        if not self.rows:
            self.rows = [RowAcceptance() for _ in range(accepted.shape[0])]
        accepted_list = accepted.tolist()
        emitted = emitted if emitted is not None else [kept + 1 for kept in accepted_list]
        for row, kept, offered, took_part, count in zip(
            self.rows, accepted_list, proposed.tolist(), active.tolist(), emitted
        ):
            if not took_part:
                continue
            row.acceptance_lengths.append(count)
            row.drafted += offered
            row.accepted += kept
            for slot in range(min(kept + 1, offered)):
                self.position_attempts[slot] += 1
                self.position_accepts[slot] += slot < kept

    def mean_acceptance_length(self) -> float:
        lengths = [length for row in self.rows for length in row.acceptance_lengths]
        return sum(lengths) / len(lengths) if lengths else 0.0

    def per_position_acceptance(self) -> list[float | None]:
        return [
            accepts / attempts if attempts else None
            for accepts, attempts in zip(self.position_accepts, self.position_attempts)
        ]

    def histogram(self) -> list[int]:
        """Counts of acceptance lengths 1 .. num_slots + 1."""
        counts = [0] * (self.num_slots + 1)
        for row in self.rows:
            for length in row.acceptance_lengths:
                counts[length - 1] += 1
        return counts

    def summary(self) -> dict:
        return {
            "mean_acceptance_length": self.mean_acceptance_length(),
            "per_position_acceptance": self.per_position_acceptance(),
            "acceptance_length_histogram": self.histogram(),
            "rounds": sum(len(row.acceptance_lengths) for row in self.rows),
            "drafted": sum(row.drafted for row in self.rows),
            "accepted": sum(row.accepted for row in self.rows),
            "per_row": [
                {"acceptance_lengths": row.acceptance_lengths, "drafted": row.drafted, "accepted": row.accepted}
                for row in self.rows
            ],
        }


def expected_acceptance_length(slot_acceptance: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[..., N] per-slot acceptance probabilities (given the prefix) -> [...] expected tokens per round, bonus included.

    E[accepted] = sum_k prod_{j<=k} alpha_j over the valid (contiguous) slots; + 1 for the target's own token.
    """
    survival = (slot_acceptance * valid).cumprod(dim=-1)
    return 1.0 + survival.sum(dim=-1)
