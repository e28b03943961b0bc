"""End-to-end speed of a SmolLM2 draft on the GPU: batch 1 (plain vs assisted vs our loop) and batches (plain vs loop).

    python3 benchmarks/speed.py --draft dspark/default_draft --out $OUT

Batch 1 uses `speed_report` of benchmarks/smollm2_default.py (three methods interleaved per prompt with a rotating
order, medians of per-prompt ratios). Batches: the same prompts in batches of B, plain batched `generate` and our
loop alternating A/B/B/A over repeats; tokens/s counts each row's tokens up to its end of turn.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from smollm2_default import speed_report, timed  # noqa: E402

from dspark import pair  # noqa: E402
from dspark.evaluation.prompt_sets import BUILTIN_PROMPT_SETS, load_prompt_set  # noqa: E402
from dspark.provenance import run_provenance  # noqa: E402
from dspark.speculative import speculative_generate  # noqa: E402


def left_padded_batch(tokenizer, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        for t in texts
    ]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def useful_tokens(new_tokens: torch.Tensor, eos: int) -> int:
    """Tokens up to and including each row's first end-of-turn (the rest is padding after the row finished)."""
    total = 0
    for row in new_tokens.tolist():
        total += row.index(eos) + 1 if eos in row else len(row)
    return total


def batch_report(
    target, tokenizer, draft, prompts: list[dict], sizes: list[int], max_new_tokens: int, repeats: int
) -> dict:
    eos = target.generation_config.eos_token_id
    report = {}
    for size in sizes:
        texts = [prompts[i % len(prompts)]["turns"][0] for i in range(size)]
        ids, mask = left_padded_batch(tokenizer, texts, target.device)
        runs = {
            "plain": lambda ids=ids, mask=mask: target.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False
            )[:, ids.shape[1] :],
            "loop": lambda ids=ids, mask=mask: speculative_generate(
                target, draft, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=eos
            )[:, ids.shape[1] :],
        }
        for run in runs.values():  # warm-up at this shape
            run()
        samples = {"plain": [], "loop": []}
        for repeat in range(repeats):
            order = ["plain", "loop", "loop", "plain"] if repeat % 2 == 0 else ["loop", "plain", "plain", "loop"]
            for name in order:
                tokens, seconds = timed(runs[name])
                samples[name].append(useful_tokens(tokens, eos) / seconds)
        speedups = [loop / plain for loop, plain in zip(samples["loop"], samples["plain"])]
        report[str(size)] = {
            "plain_tokens_per_second": samples["plain"],
            "loop_tokens_per_second": samples["loop"],
            "median_speedup": statistics.median(speedups),
            "speedup_range": [min(speedups), max(speedups)],
        }
        print(size, json.dumps(report[str(size)]), flush=True)
    return report


def loop_phases(target, tokenizer, draft, prompt: str, max_new_tokens: int) -> dict:
    """Where the time of one batch-1 loop run goes (seconds per phase, host clock; CUDA work may be attributed to the
    phase that first waits for it)."""
    ids, mask = left_padded_batch(tokenizer, [prompt], target.device)
    out = speculative_generate(target, draft, ids, mask, max_new_tokens=max_new_tokens, return_stats=True)
    return {
        "seconds": out.stats["seconds"],
        "rounds": out.stats["rounds"],
        "mean_acceptance_length": out.stats["mean_acceptance_length"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", default="default")
    parser.add_argument("--out", required=True)
    parser.add_argument("--speed-prompts", type=int, default=3, help="per domain, batch 1")
    parser.add_argument("--speed-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--batch-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target, tokenizer, draft = pair.load_pair("smollm2", args.draft, device="cuda", dtype="bfloat16")
    prompts = [r for name in BUILTIN_PROMPT_SETS for r in load_prompt_set(name)[-args.speed_prompts :]]
    report = {"provenance": run_provenance("cuda"), "draft": str(args.draft)}
    report["phases"] = loop_phases(target, tokenizer, draft, prompts[0]["turns"][0], args.speed_tokens)
    report["batch_1"] = speed_report(target, tokenizer, draft, prompts, args.speed_tokens)
    print(json.dumps(report["batch_1"]["summary"]), flush=True)
    (out / "speed.json").write_text(json.dumps(report, indent=1))
    report["batches"] = batch_report(
        target, tokenizer, draft, prompts, args.batch_sizes, args.batch_tokens, args.repeats
    )
    (out / "speed.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
