"""`dspark card`: write a draft's model card (README.md with Hugging Face Hub front matter) from its checkpoint, its
training record and the JSON of `dspark eval` / `dspark bench`. Without results the card says nothing was measured.

    dspark card runs/q8/final --results results/eval/eval.json results/bench/bench.json \\
        --training-config runs/q8 --base-model Qwen/Qwen3-8B --plots-dir runs/q8/final/assets
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .model_card.render import DEFAULT_LICENSE, render_model_card
from .pair import resolve_draft_path

COMMAND = "card"
HELP = "write a draft's model card (README.md for the Hub) from its checkpoint, training record and results"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="the draft's folder (config.json + safetensors), or `default`")
    parser.add_argument(
        "--results",
        nargs="+",
        action="extend",
        default=[],
        help="eval.json / bench.json files (and the older benchmarks/*.py outputs); none: 'no measured results yet'",
    )
    parser.add_argument(
        "--training-config", help="a `dspark train` output folder (config, provenance, metrics) or a config file"
    )
    parser.add_argument(
        "--base-model", help="Hub id of the target (default: the target named in the training record or results)"
    )
    parser.add_argument("--license", default=DEFAULT_LICENSE, help=f"Hub licence id (default {DEFAULT_LICENSE})")
    parser.add_argument("--dataset", action="append", default=[], help="Hub id of a training dataset; repeatable")
    parser.add_argument("--draft-name", help="this draft's name inside the results files when they compare several")
    parser.add_argument("--repo-id", help="where users will load the draft from (its Hub id), for the usage code")
    parser.add_argument("--plots-dir", help="draw the figures here (PNG, needs matplotlib) and link them in the card")
    parser.add_argument("--no-vllm", action="store_true", help="leave out the note on serving with patched vLLM")
    parser.add_argument("--output", help="where to write the card (default: CHECKPOINT/README.md)")


def run(args: argparse.Namespace) -> int:
    checkpoint = Path(resolve_draft_path(args.checkpoint))
    output = Path(args.output) if args.output else checkpoint / "README.md"
    card = render_model_card(
        checkpoint,
        args.results,
        training_config=args.training_config,
        base_model=args.base_model,
        license=args.license,
        datasets=args.dataset,
        draft_name=args.draft_name,
        repo_id=args.repo_id,
        plots_dir=args.plots_dir,
        card_dir=output.parent,
        include_vllm=not args.no_vllm,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    partial.write_text(card)
    partial.replace(output)  # a reader never sees half a card
    print(f"dspark card: wrote {output}")
    return 0
