"""`dspark eval`: offline acceptance of one or more drafts on the target's own answers, per prompt set and domain,
at given temperatures, draft lengths (K) and confidence thresholds, with a paired comparison of two arms; writes
OUT/eval.json (with provenance), OUT/eval.md and per-position acceptance plots (OUT/per_position_T*.png).

    dspark eval --draft default --draft other=path/to/draft --prompts mt_bench --prompts humaneval \\
        --prompts mmath_en --limit 80 --temperature 0 1 --out results/eval
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .. import pair
from .continuations import default_cache_root, target_continuations
from .offline import arm_names, drafting_settings, offline_acceptance
from .paired import compare_arms
from .plots import acceptance_curves
from .prompt_sets import BUILTIN_PROMPT_SETS
from .report import document, eval_markdown, eval_section, temperature_key, write_document

COMMAND = "eval"
HELP = "offline acceptance of drafts on the target's own answers (per domain, paired CIs, plots)"


def draft_tokens_value(text: str) -> int | None:
    """`all` (the whole block) or a positive integer K."""
    return None if text == "all" else int(text)


def threshold_value(text: str) -> float | None:
    """`config` (the draft's own threshold) or a number in [0, 1] (0: no early stop)."""
    return None if text == "config" else float(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=pair.DEFAULT_TARGET, help="smollm2 (default) or a HF model path")
    parser.add_argument(
        "--draft",
        action="append",
        default=None,
        help="PATH, NAME=PATH or `default` (the embedded draft); repeatable, every draft is scored on the same data",
    )
    parser.add_argument(
        "--prompts",
        action="extend",
        nargs="+",
        default=None,
        help=f"built-in sets ({', '.join(BUILTIN_PROMPT_SETS)}) or JSONL files; repeatable (default: all built-in)",
    )
    parser.add_argument("--limit", type=int, default=80, help="prompts per set (the first N)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="length of the target's answers")
    parser.add_argument("--temperature", type=float, nargs="+", default=[0.0], help="0: loop replay; >0: expectation")
    parser.add_argument(
        "--max-draft-tokens",
        type=draft_tokens_value,
        nargs="+",
        default=[None],
        help="K, drafted tokens per round: integers and/or `all` (a sweep)",
    )
    parser.add_argument(
        "--confidence-threshold",
        type=threshold_value,
        nargs="+",
        default=[None],
        help="early-stop thresholds: numbers (0 = off) and/or `config` (the draft's own; default)",
    )
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="arms to compare (default: the first two)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per target forward when scoring")
    parser.add_argument("--anchor-chunk", type=int, default=128, help="anchors per draft forward (bounds memory)")
    parser.add_argument("--generation-batch-size", type=int, default=64, help="batch for the target's answers")
    parser.add_argument("--max-prompt-tokens", type=int, default=2048, help="longer prompts are skipped and counted")
    parser.add_argument("--cache-dir", default=None, help=f"answers cache (default {default_cache_root()})")
    parser.add_argument("--seed", type=int, default=1, help="sampling seed of the target's answers at T > 0")
    parser.add_argument("--bootstrap-replicates", type=int, default=2000)
    parser.add_argument("--bootstrap-seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--out", required=True, help="output folder")


def named_drafts(specs: list[str] | None) -> dict[str, str]:
    """NAME -> path from `PATH`, `NAME=PATH` or `default` (the name of a bare path is its folder's name)."""
    named = {}
    for spec in specs or [pair.DEFAULT_DRAFT]:
        name, separator, path = spec.partition("=")
        if not separator:
            name, path = (Path(spec).name or spec), spec
        if name in named:
            raise ValueError(f"dspark eval: two drafts are called {name!r}; name them with --draft NAME=PATH.")
        named[name] = path
    return named


def load_drafts(specs: dict[str, str], target, target_name: str) -> dict:
    drafts = {}
    for name, path in specs.items():
        try:
            drafts[name] = pair.load_draft(path, target)
        except ValueError as error:
            raise ValueError(
                f"dspark eval: draft {name!r} ({path}) cannot serve the target {target_name}: {error}"
            ) from None
    return drafts


def compared_arms(requested: list[str] | None, arms: list[str]) -> tuple[str, str] | None:
    """The pair to compare: --compare A B (checked), else the first two arms, else none."""
    if requested:
        missing = [name for name in requested if name not in arms]
        if missing:
            raise ValueError(f"dspark eval: --compare names unknown arms {missing}; the arms are {', '.join(arms)}.")
        return requested[0], requested[1]
    return (arms[0], arms[1]) if len(arms) >= 2 else None


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target, tokenizer = pair.load_target(args.target, args.device, args.dtype)
    if tokenizer is None:
        raise ValueError(f"dspark eval: the target {args.target} has no tokenizer to write its answers with.")
    specs = named_drafts(args.draft)
    drafts = load_drafts(specs, target, args.target)
    settings = drafting_settings(args.max_draft_tokens, args.confidence_threshold)
    arms = list(arm_names(drafts, settings).values())
    pair_to_compare = compared_arms(args.compare, arms)  # checked before the long part starts
    prompt_sets = args.prompts or list(BUILTIN_PROMPT_SETS)
    payload = document(
        "dspark eval",
        args.device,
        {key: value for key, value in vars(args).items() if key != "run"},
        {"generation": args.seed, "bootstrap": args.bootstrap_seed},
    )
    payload.update({"target": args.target, "drafts": specs, "prompt_sets": prompt_sets})
    for temperature in args.temperature:
        records, sources = target_continuations(
            target,
            tokenizer,
            prompt_sets,
            limit=args.limit,
            temperature=temperature,
            max_new_tokens=args.max_new_tokens,
            cache_root=args.cache_dir,
            batch_size=args.generation_batch_size,
            max_prompt_tokens=args.max_prompt_tokens,
            seed=args.seed,
            progress=not args.no_progress,
        )
        result = offline_acceptance(
            target,
            drafts,
            records,
            temperature=temperature,
            max_draft_tokens=args.max_draft_tokens,
            confidence_threshold=args.confidence_threshold,
            batch_size=args.batch_size,
            anchor_chunk=args.anchor_chunk,
            progress=not args.no_progress,
        )
        paired = None
        if pair_to_compare:
            paired = compare_arms(
                result, *pair_to_compare, replicates=args.bootstrap_replicates, seed=args.bootstrap_seed
            )
        key = temperature_key(temperature)
        payload[key] = eval_section(result, sources, paired)
        acceptance_curves(payload[key], out / f"per_position_{key}.png")
    markdown = eval_markdown(payload)
    json_path, _ = write_document(out, "eval", payload, markdown)
    print(markdown)
    print(f"dspark eval: wrote {json_path} and {out / 'eval.md'}")
    return 0
