"""`dspark train`: train (or resume) a draft on a dataset written by `dspark data respond`.

Single process: `dspark train --config train.yaml`. Many GPUs: `accelerate launch -m dspark.cli train --config ...`
(DDP by default; FSDP through `accelerate config`). Rerunning with the same --output-dir resumes exactly.
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
    from .trainer import train

    config = config_from_arguments(args)
    metrics = train(config)
    print(json.dumps(metrics, indent=2))
    return 0
