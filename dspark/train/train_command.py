"""`dspark train`: train (or resume) a draft on a dataset written by `dspark data respond`.

Single process: `dspark train --config train.yaml`. Many processes:
`accelerate launch --multi_gpu --num_processes N -m dspark.cli train --config ...` (DDP; FSDP with `--use_fsdp`, see
the README). `batch_size` is per process: a step trains on batch_size x N x gradient_accumulation_steps sequences.
Rerunning with the same --output-dir resumes exactly.
"""

from __future__ import annotations

import argparse
import json

from .config import add_config_arguments, config_from_arguments

COMMAND = "train"
HELP = "train a DSpark draft on the target's own (on-policy) responses; resumes from --output-dir"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from .trainer import train

    config = config_from_arguments(args)
    metrics = train(config)
    if PartialState().is_main_process:  # every process returns the same (summed) metrics: print them once
        print(json.dumps(metrics, indent=2))
    return 0
