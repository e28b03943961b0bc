"""Which sequences each process trains on: one global batch sequence, whatever the number of processes.

A run is defined by its global batch: `batch_size x processes x gradient_accumulation_steps` sequences per optimizer
step. Each epoch's shuffled order is cut into micro-batches of `batch_size` sequences, numbered globally from the start
of the run. Optimizer step s consumes micro-batches [s * M, (s + 1) * M), M = processes x accumulation; process r takes
those whose index is r modulo the process count. A step's gradient is the mean of its M micro-batch gradients however
they are spread over processes and accumulation, so one process accumulating 4 micro-batches and two processes
accumulating 2 each follow the same parameter trajectory (up to floating-point summation order), and a run may resume
with another process count as long as its global batch stays the same. The anchors of a micro-batch come from a
generator seeded by its global index, so they do not depend on which process draws them either.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


@lru_cache(maxsize=2)
def epoch_order(count: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The shuffled order of `count` training sequences in `epoch` (cached: every micro-batch of an epoch reads it)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(count, generator=generator).tolist())


@dataclass(frozen=True)
class MicroBatchPlan:
    """The global micro-batch sequence of a run and each process's share of it."""

    sequences: int  # training sequences
    batch_size: int  # sequences per micro-batch (per process)
    processes: int
    accumulation: int  # micro-batches per process and optimizer step
    seed: int

    @property
    def micro_batches_per_step(self) -> int:
        return self.processes * self.accumulation

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step, over all processes."""
        return self.batch_size * self.micro_batches_per_step

    @property
    def steps_per_epoch(self) -> int:
        # An epoch ends at a global-batch boundary (its last partial global batch is dropped): the wrap point must not
        # depend on how the global batch is split, or 1 and N processes would see different epochs.
        return self.sequences // self.global_batch

    def indices_for(self, step: int, rank: int) -> list[int]:
        """The global micro-batch indices that process `rank` trains on at optimizer step `step`, in order."""
        first = step * self.micro_batches_per_step
        return [first + k * self.processes + rank for k in range(self.accumulation)]

    def sequence_positions(self, index: int) -> list[int]:
        """Positions (in the training records) of the sequences of global micro-batch `index`."""
        if self.steps_per_epoch < 1:
            raise ValueError(f"{self.sequences} training sequences do not fill one global batch of {self.global_batch}")
        epoch, within = divmod(index, self.steps_per_epoch * self.micro_batches_per_step)
        order = epoch_order(self.sequences, self.seed, epoch)
        return list(order[within * self.batch_size : (within + 1) * self.batch_size])

    def anchor_seed(self, index: int) -> int:
        """Seed of the anchor draw of global micro-batch `index`."""
        return self.seed * 1_000_003 + index


def round_robin_share(count: int, rank: int, processes: int) -> list[int | None]:
    """Process `rank`'s items of `count` (items rank, rank + processes, ...), padded with None to the longest share.

    Every process must make the same number of forward calls (FSDP gathers parameters collectively in each), so a
    process with a shorter share runs a throw-away forward for each None.
    """
    rounds = -(-count // processes)
    return [index if (index := round_ * processes + rank) < count else None for round_ in range(rounds)]
