"""`dspark bench`: end-to-end greedy generation throughput of plain decoding, assisted generation with the draft,
dspark's own loop and prompt lookup decoding, in ABBA order over several rounds and batch sizes; paired speedups with
bootstrap intervals, token match against plain, GPU memory; optionally the same protocol against two
OpenAI-compatible servers (e.g. vLLM with and without speculative decoding). Writes OUT/bench.json, OUT/bench.md
and OUT/throughput.png.

    dspark bench --draft default --methods plain,assisted,loop,lookup --batch-sizes 1 4 --rounds 4 --out results/bench
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .. import pair
from .bench import METHOD_NAMES, run_bench
from .plots import throughput_vs_batch
from .prompt_sets import BUILTIN_PROMPT_SETS, load_prompt_set
from .report import bench_markdown, document, write_document
from .serving import run_serving_bench

COMMAND = "bench"
HELP = "end-to-end throughput: plain vs assisted vs own loop vs prompt lookup (ABBA, paired speedup CIs)"
NO_DRAFT = "none"


def method_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHOD_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown methods {unknown}; choose from {', '.join(METHOD_NAMES)}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=pair.DEFAULT_TARGET, help="smollm2 (default) or a HF model path")
    parser.add_argument("--draft", default=pair.DEFAULT_DRAFT, help=f"PATH, `default`, or `{NO_DRAFT}`")
    parser.add_argument(
        "--methods",
        type=method_list,
        default=["plain", "assisted", "loop", "lookup"],
        help=f"comma-separated, from {', '.join(METHOD_NAMES)} (plain is the baseline)",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=4, help="ABBA rounds per workload (even: A B | B A pairs)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prompts", action="extend", nargs="+", default=None, help="prompt sets or JSONL files")
    parser.add_argument("--limit", type=int, default=3, help="prompts per set")
    parser.add_argument("--lookup-tokens", type=int, default=10, help="prompt_lookup_num_tokens for `lookup`")
    parser.add_argument("--bootstrap-replicates", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--serving-spec-url", default=None, help="OpenAI-compatible server with speculative decoding")
    parser.add_argument("--serving-base-url", default=None, help="the same model served without it")
    parser.add_argument("--serving-model", default=None, help="model name (default: the first under /v1/models)")
    parser.add_argument("--serving-concurrency", type=int, nargs="+", default=None, help="default: --batch-sizes")
    parser.add_argument("--serving-timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--out", required=True, help="output folder")


def write_partial(out: Path, payload: dict, local: dict) -> None:
    """OUT/bench.partial.json: the batch sizes measured so far (the final bench.json replaces nothing else)."""
    (out / "bench.partial.json").write_text(json.dumps({**payload, "local": local}, indent=1))


def run(args: argparse.Namespace) -> int:
    from ..train.responses import encode_prompt, pad_token_id_for, stop_token_ids

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target, tokenizer = pair.load_target(args.target, args.device, args.dtype)
    if tokenizer is None:
        raise ValueError(f"dspark bench: the target {args.target} has no tokenizer to encode the prompts with.")
    draft = None
    if args.draft != NO_DRAFT:
        try:
            draft = pair.load_draft(args.draft, target)
        except ValueError as error:
            raise ValueError(f"dspark bench: the draft {args.draft} cannot serve {args.target}: {error}") from None
    records = [r for name in args.prompts or list(BUILTIN_PROMPT_SETS) for r in load_prompt_set(name, args.limit)]
    stop_ids = stop_token_ids(target, tokenizer)
    pad = pad_token_id_for(tokenizer, stop_ids)
    payload = document(
        "dspark bench",
        args.device,
        {key: value for key, value in vars(args).items() if key != "run"},
        {"bootstrap": args.seed},
    )
    payload.update({"target": args.target, "draft": args.draft, "prompts": [r["id"] for r in records]})
    payload["local"] = run_bench(
        target,
        draft,
        [encode_prompt(tokenizer, record, chat=True) for record in records],
        [r["id"] for r in records],
        methods=args.methods,
        batch_sizes=args.batch_sizes,
        rounds=args.rounds,
        max_new_tokens=args.max_new_tokens,
        stop_ids=set(stop_ids),
        pad_token_id=pad,
        lookup_tokens=args.lookup_tokens,
        replicates=args.bootstrap_replicates,
        seed=args.seed,
        progress=not args.no_progress,
        on_batch_size=lambda partial: write_partial(out, payload, partial),
    )
    payload["serving"] = run_serving_bench(
        args.serving_spec_url,
        args.serving_base_url,
        [r["turns"][0] for r in records],
        [r["id"] for r in records],
        concurrency=args.serving_concurrency or args.batch_sizes,
        rounds=args.rounds,
        max_tokens=args.max_new_tokens,
        model=args.serving_model,
        timeout=args.serving_timeout,
        replicates=args.bootstrap_replicates,
        seed=args.seed,
        progress=not args.no_progress,
    )
    throughput_vs_batch(payload["local"], out / "throughput.png")
    if "summary" in payload["serving"]:
        throughput_vs_batch(payload["serving"], out / "serving_throughput.png")
    markdown = bench_markdown(payload)
    json_path, _ = write_document(out, "bench", payload, markdown)
    print(markdown)
    print(f"dspark bench: wrote {json_path} and {out / 'bench.md'}")
    return 0
