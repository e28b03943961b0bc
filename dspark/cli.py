"""The `dspark` command line: one subcommand per job, each defined beside the code it runs."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from . import card_command, convert, export_command, generate_command, selfcheck
    from .demo import command as demo_command
    from .evaluation import bench_command, eval_command
    from .train import data_command, train_command
    from .vllm import command as vllm_command

    parser = argparse.ArgumentParser(prog="dspark", description="DSpark speculative-decoding drafts for transformers")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in (
        generate_command,
        selfcheck,
        convert,
        export_command,
        data_command,
        train_command,
        eval_command,
        bench_command,
        card_command,
        vllm_command,
        demo_command,
    ):
        sub = commands.add_parser(module.COMMAND, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
