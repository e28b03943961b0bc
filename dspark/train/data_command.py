"""`dspark data`: build training prompts, and have the target answer them (on-policy data for `dspark train`).

dspark data prompts --source topics:4000 --source code:500 --source math:1500 --source file:mine.jsonl --out p.jsonl
dspark data self-instruct --count 500 --out self.jsonl          # prompts written by the target itself
dspark data respond --prompts p.jsonl --out data/greedy --temperature 0
"""

from __future__ import annotations

import argparse
import json

import torch

from .. import pair

COMMAND = "data"
HELP = "build training prompts and the target's own answers to them (on-policy data)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    stages = parser.add_subparsers(dest="stage", required=True)
    prompts = stages.add_parser("prompts", help="prompts from shipped generators and files, leak-checked")
    prompts.add_argument(
        "--source",
        action="append",
        required=True,
        help="topics:COUNT, code:COUNT, math:COUNT or file:PATH (repeatable)",
    )
    prompts.add_argument("--seed", type=int, default=0)
    prompts.add_argument("--out", required=True, help="output JSONL")

    for name, help_text in (("self-instruct", "prompts written by the target"), ("respond", "answers by the target")):
        stage = stages.add_parser(name, help=help_text)
        stage.add_argument("--target", default=pair.DEFAULT_TARGET, help="smollm2 (default) or a HF model path")
        stage.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        stage.add_argument("--dtype", default="auto")
        stage.add_argument("--seed", type=int, default=0)
        stage.add_argument("--batch-size", type=int, default=64)
        stage.add_argument("--out", required=True)
    self_instruct = stages.choices["self-instruct"]
    self_instruct.add_argument("--count", type=int, required=True)
    respond = stages.choices["respond"]
    respond.add_argument("--prompts", required=True, help="JSONL or JSON prompt file")
    respond.add_argument("--max-new-tokens", type=int, default=384)
    respond.add_argument("--max-prompt-tokens", type=int, default=512)
    respond.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    respond.add_argument("--top-p", type=float, default=None)
    respond.add_argument("--top-k", type=int, default=None)
    respond.add_argument("--raw", action="store_true", help="no chat template")
    respond.add_argument("--limit", type=int, default=None, help="answer only the first N prompts")
    respond.add_argument("--overwrite", action="store_true", help="discard answers already in --out")


def write_jsonl(records: list[dict], path: str) -> None:
    with open(path, "w") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def run(args: argparse.Namespace) -> int:
    from .prompts import build_prompts, load_prompt_file, self_instruct_prompts
    from .responses import generate_responses

    if args.stage == "prompts":
        records = build_prompts(args.source, seed=args.seed)
        write_jsonl(records, args.out)
        print(f"wrote {len(records)} prompts to {args.out}")
        return 0
    target, tokenizer = pair.load_target(args.target, args.device, args.dtype)
    if tokenizer is None:
        raise ValueError(f"dspark data: the target {args.target} has no tokenizer.")
    if args.stage == "self-instruct":
        records = self_instruct_prompts(target, tokenizer, args.count, seed=args.seed, batch_size=args.batch_size)
        write_jsonl(records, args.out)
        print(f"wrote {len(records)} self-instruct prompts to {args.out}")
        return 0
    prompts = load_prompt_file(args.prompts)[: args.limit]
    manifest = generate_responses(
        target,
        tokenizer,
        prompts,
        args.out,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        chat=not args.raw,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(json.dumps(manifest["counts"]))
    return 0
