"""Loss statistics summed over micro-batches and then over processes, so a logged number describes a whole global batch.

Each micro-batch counts once in the loss terms, as it does in the gradient (the mean of micro-batch means); per-slot
acceptance is weighted by each micro-batch's valid-slot count, so it is a mean over all drafted slots.
"""

from __future__ import annotations

import torch

from .objective import BlockLoss

LOSS_TERMS = ("loss", "ce", "tv", "confidence", "expected_length")


class LossTotals:
    """Running sums of `BlockLoss` results and token counts, kept on the device so that adding never synchronises."""

    def __init__(self, num_slots: int, device: torch.device):
        self.num_slots = num_slots
        # layout: micro-batch count, LOSS_TERMS, then three [num_slots] blocks: acceptance, greedy match, slot count
        self.sums = torch.zeros(1 + len(LOSS_TERMS) + 3 * num_slots, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, result: BlockLoss, tokens: int) -> None:
        """Count one micro-batch: its loss terms and `tokens`, the sequence tokens it covered."""
        terms = torch.stack(
            [
                torch.ones((), device=result.total.device),
                result.total.detach().float(),
                result.ce.float(),
                result.tv.float(),
                result.confidence.float(),
                result.expected_length.float(),
            ]
        )
        count = result.slot_count
        slots = torch.cat([result.slot_acceptance * count, result.slot_greedy_match * count, count])
        self.sums += torch.cat([terms.to(self.sums), slots.to(self.sums)])
        self.tokens += tokens

    def summed_across_processes(self, accelerator) -> LossTotals:
        """The totals of all processes (a collective: every process must call it at the same point)."""
        packed = torch.cat([self.sums, self.sums.new_tensor([self.tokens])])
        packed = accelerator.reduce(packed, reduction="sum")
        total = LossTotals(self.num_slots, self.sums.device)
        total.sums, total.tokens = packed[:-1], int(packed[-1])
        return total

    def means(self) -> dict:
        """Mean loss terms per micro-batch and per-slot rates over all valid slots; `micro_batches` and `tokens`."""
        sums = self.sums.cpu()
        micro_batches = float(sums[0])
        first_slot = 1 + len(LOSS_TERMS)
        terms = {name: float(value) / max(micro_batches, 1.0) for name, value in zip(LOSS_TERMS, sums[1:first_slot])}
        acceptance, greedy_match, slot_count = sums[first_slot:].view(3, self.num_slots)
        return {
            **terms,
            "slot_acceptance": (acceptance / slot_count.clamp(min=1)).tolist(),
            "slot_greedy_match": (greedy_match / slot_count.clamp(min=1)).tolist(),
            "micro_batches": int(micro_batches),
            "tokens": self.tokens,
        }
