"""`dspark train` inside one process of `accelerate launch`, recording what the process trains on, optionally dying.

    accelerate launch --multi_gpu --num_processes 2 tests/distributed_train_worker.py RECORD_DIR DIE_AFTER -- ARGS

ARGS are `dspark train` options, handled by the real command line. Every process appends one JSON line per micro-batch
to RECORD_DIR/rank-<process index>.jsonl: {"step": optimizer steps done before it, "index": global micro-batch index,
"ids": record ids}. With DIE_AFTER > 0, process 1 kills itself with SIGKILL (no clean-up, like a lost machine) when it
has finished DIE_AFTER optimizer steps and is about to start the next.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from dspark import cli
from dspark.train.trainer import Trainer


def record_micro_batches(record_dir: Path) -> None:
    original = Trainer.micro_batch_records

    def micro_batch_records(self: Trainer, index: int) -> list[dict]:
        records = original(self, index)
        line = {"step": self.step, "index": index, "ids": [r["id"] for r in records]}
        with open(record_dir / f"rank-{self.accelerator.process_index}.jsonl", "a") as handle:
            handle.write(json.dumps(line) + "\n")
        return records

    Trainer.micro_batch_records = micro_batch_records


def die_after(steps: int) -> None:
    original = Trainer.train_step

    def train_step(self: Trainer):
        if self.step == steps and self.accelerator.process_index == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self)

    Trainer.train_step = train_step


def main() -> int:
    record_dir, die_after_steps, separator, *train_arguments = sys.argv[1:]
    if separator != "--":
        raise SystemExit(__doc__)
    record_micro_batches(Path(record_dir))
    if int(die_after_steps) > 0:
        die_after(int(die_after_steps))
    return cli.main(["train", *train_arguments])


if __name__ == "__main__":
    sys.exit(main())
