"""`dspark data`: build training prompts, then have the target answer them (on-policy data for `dspark train`).

    dspark data prompts --source topics:4000 --source code:1000 --source math:1500 --source file:mine.jsonl \\
        --seed 0 --out prompts.jsonl
    dspark data prompts --source self_instruct:500 --target smollm2 --out self.jsonl   # written by the target
    dspark data respond --prompts prompts.jsonl --out data/greedy --temperature 0
    dspark data respond --prompts prompts.jsonl --out data/sampled --temperature 0.7 --top-p 0.9

`respond` resumes: rerun the same command after an interruption.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch

COMMAND = "data"
HELP = "build training prompts and the target's own answers to them (on-policy data)"


def _add_target_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    from ..pair import DEFAULT_TARGET

    parser.add_argument(
        "--target",
        default=DEFAULT_TARGET,
        help=f"{what}: `smollm2` (default, the offline SmolLM2-135M-Instruct) or a HF model path / repo id",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    stages = parser.add_subparsers(dest="stage", required=True)

    prompts = stages.add_parser("prompts", help="training prompts from shipped generators and files, leak-checked")
    prompts.add_argument(
        "--source",
        action="append",
        required=True,
        help="topics:COUNT, code:COUNT, math:COUNT, self_instruct:COUNT (needs the target) or file:PATH "
        "(JSONL/JSON; prompt, turns, messages, conversations or instruction records); repeatable",
    )
    prompts.add_argument("--seed", type=int, default=0, help="generators, sampling and shuffling are seeded by it")
    prompts.add_argument("--out", required=True, help="output JSONL file")
    _add_target_arguments(prompts, "the model that writes self_instruct prompts (loaded only for that source)")

    respond = stages.add_parser("respond", help="the target's answers to a prompt file, cached as token ids")
    respond.add_argument("--prompts", required=True, help="prompt file (JSONL or JSON, any format `prompts` reads)")
    respond.add_argument("--out", required=True, help="dataset folder (created, or resumed if it exists)")
    _add_target_arguments(respond, "the model that answers")
    respond.add_argument("--batch-size", type=int, default=64)
    respond.add_argument("--max-new-tokens", type=int, default=384)
    respond.add_argument(
        "--max-prompt-tokens", type=int, default=512, help="longer prompts are skipped and counted, never truncated"
    )
    respond.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    respond.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: off)")
    respond.add_argument("--top-k", type=int, default=None, help="top-k sampling (default: off)")
    respond.add_argument("--raw", action="store_true", help="plain text prompts, no chat template")
    respond.add_argument("--seed", type=int, default=0, help="batch b is sampled after torch.manual_seed(seed + b)")
    respond.add_argument(
        "--eos-token-id", type=int, action="append", default=None, help="end-of-answer id (default: the target's)"
    )
    respond.add_argument("--limit", type=int, default=None, help="answer only the first N prompts")
    respond.add_argument("--overwrite", action="store_true", help="discard the answers already in --out")
    respond.add_argument("--no-progress", action="store_true", help="no progress bar")


def _file_description(path: str) -> str:
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    return f"{path} (sha256 {digest})"


def run(args: argparse.Namespace) -> int:
    from ..pair import load_target
    from .prompts import build_prompts, load_prompt_file, parse_source_spec, write_prompt_file
    from .responses import generate_responses

    if args.stage == "prompts":
        kinds = [parse_source_spec(spec)[0] for spec in args.source]  # bad specs fail before a model is loaded
        target = tokenizer = None
        if "self_instruct" in kinds:
            target, tokenizer = load_target(args.target, args.device, args.dtype)
        records = build_prompts(args.source, seed=args.seed, target=target, tokenizer=tokenizer)
        write_prompt_file(records, args.out)
        by_source: dict[str, int] = {}
        for record in records:
            by_source[record["source"]] = by_source.get(record["source"], 0) + 1
        print(f"wrote {len(records)} prompts to {args.out}: {json.dumps(by_source)}")
        return 0

    prompts = load_prompt_file(args.prompts)[: args.limit]
    target, tokenizer = load_target(args.target, args.device, args.dtype)
    if tokenizer is None:
        raise ValueError(f"dspark: the target {args.target} has no tokenizer; `dspark data respond` needs one.")
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
        eos_token_id=args.eos_token_id,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        prompt_source=_file_description(args.prompts),
    )
    print(f"{args.out}: {json.dumps(manifest['counts'])}")
    return 0
