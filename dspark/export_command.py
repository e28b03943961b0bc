"""`dspark export SRC DST --vllm`: write a draft in a serving engine's format (today: vLLM 0.23.0).

The same export as `dspark vllm export`; upstream checkpoint layouts (z-lab DFlash, DeepSpec) are written by
`dspark convert --to ...`.
"""

from __future__ import annotations

import argparse

from .vllm.command import add_draft_export_arguments, export_draft

COMMAND = "export"
HELP = "write a draft as a checkpoint a serving engine loads (--vllm: vLLM 0.23.0, method 'dflash')"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_draft_export_arguments(parser)
    parser.add_argument("--vllm", action="store_true", help="for vLLM 0.23.0 (patched with `dspark vllm patch`)")


def run(args: argparse.Namespace) -> int:
    if not args.vllm:
        raise ValueError(
            "name the format to export to: --vllm (vLLM 0.23.0). For z-lab DFlash or DeepSpec checkpoints use "
            "`dspark convert SRC DST --to zlab-dflash|deepspec`."
        )
    return export_draft(args)


__all__ = ["COMMAND", "HELP", "add_arguments", "run"]
