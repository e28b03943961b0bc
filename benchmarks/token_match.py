"""Token-match rate of speculative decoding against the target's plain greedy output, per dtype and path.

Verifying k tokens in one forward sums in a different order than decoding one token at a time; in float32 this
only matters at near-ties, in bf16 it shows up as divergences. This measures how often each path reproduces plain
greedy on the real SmolLM2-135M-Instruct, next to transformers' own prompt-lookup decoding as a reference point.

    python benchmarks/token_match.py --out docs/results/token_match [--device cuda] [--max-new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dspark import DSparkDraftModel  # noqa: E402
from dspark.provenance import run_provenance  # noqa: E402
from dspark.targets import chat_prompt, load_smollm2  # noqa: E402

# Written for this measurement; deliberately not taken from the evaluation sets (MT-bench, HumanEval, MMATH).
PROMPTS = [
    "Explain in three sentences why the sky is blue.",
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "What is 17 multiplied by 23? Show the steps.",
    "Give me a short packing list for a weekend hiking trip.",
    "Describe the difference between a list and a tuple in Python.",
    "Write a haiku about autumn rain.",
    "If a train travels 120 km in 1.5 hours, what is its average speed?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
]

PATHS = {
    "assistant_model (dspark generate)": lambda draft: {"assistant_model": draft},
    "speculation_type=dflash": lambda draft: {"assistant_model": draft, "speculation_type": "dflash"},
    "prompt lookup (transformers)": lambda draft: {"prompt_lookup_num_tokens": 8},
}


def matched_prefix(reference: torch.Tensor, other: torch.Tensor) -> int:
    length = min(reference.shape[0], other.shape[0])
    diff = (reference[:length] != other[:length]).nonzero()
    return int(diff[0, 0]) if diff.numel() else length


def generate(target, prompt, max_new_tokens, **kwargs) -> tuple[torch.Tensor, int, float]:
    calls = [0]
    handle = target.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        output = target.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    finally:
        handle.remove()
    return output[0, prompt.shape[1] :].cpu(), calls[0], seconds


def measure(dtype: torch.dtype, device: str, max_new_tokens: int, block_size: int) -> dict:
    target, tokenizer = load_smollm2(device=device, dtype=dtype)
    torch.manual_seed(0)
    draft = DSparkDraftModel.from_target(
        target, block_size=block_size, markov_rank=32, enable_confidence_head=True
    ).eval()
    rows = {name: [] for name in PATHS}
    for message in PROMPTS:
        prompt = chat_prompt(tokenizer, message).to(device)
        generate(target, prompt, 4)  # warm-up
        reference, reference_calls, reference_seconds = generate(target, prompt, max_new_tokens)
        for name, kwargs in PATHS.items():
            output, calls, seconds = generate(target, prompt, max_new_tokens, **kwargs(draft))
            prefix = matched_prefix(reference, output)
            rows[name].append(
                {
                    "prompt": message,
                    "generated": int(output.shape[0]),
                    "reference_generated": int(reference.shape[0]),
                    "identical": bool(torch.equal(reference, output)),
                    "matched_prefix": prefix,
                    "positionwise_agreement": float(
                        (reference[: min(len(reference), len(output))] == output[: min(len(reference), len(output))])
                        .float()
                        .mean()
                    ),
                    "target_forwards": calls,
                    "reference_forwards": reference_calls,
                    "seconds": seconds,
                    "reference_seconds": reference_seconds,
                }
            )
    summary = {}
    for name, items in rows.items():
        summary[name] = {
            "identical_sequences": sum(item["identical"] for item in items),
            "sequences": len(items),
            "matched_prefix_fraction": sum(item["matched_prefix"] for item in items)
            / sum(item["reference_generated"] for item in items),
            "median_positionwise_agreement": statistics.median(item["positionwise_agreement"] for item in items),
            "target_forwards_per_token": sum(item["target_forwards"] for item in items)
            / sum(item["generated"] for item in items),
        }
    return {"summary": summary, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for token_match.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=8)
    args = parser.parse_args()

    result = {
        "what": "token match of speculative decoding vs plain greedy, untrained DSpark draft, SmolLM2-135M-Instruct",
        "provenance": run_provenance(args.device),
        "settings": {"max_new_tokens": args.max_new_tokens, "block_size": args.block_size, "prompts": len(PROMPTS)},
        "by_dtype": {},
    }
    for dtype_name in args.dtypes.split(","):
        result["by_dtype"][dtype_name] = measure(
            getattr(torch, dtype_name), args.device, args.max_new_tokens, args.block_size
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "token_match.json").write_text(json.dumps(result, indent=2))
    print(f"{'dtype':9} {'path':36} {'identical':>9} {'prefix':>7} {'agree':>6} {'fwd/tok':>7}")
    for dtype_name, block in result["by_dtype"].items():
        for name, row in block["summary"].items():
            print(
                f"{dtype_name:9} {name:36} {row['identical_sequences']:>4}/{row['sequences']:<4} "
                f"{row['matched_prefix_fraction']:>7.3f} {row['median_positionwise_agreement']:>6.3f} "
                f"{row['target_forwards_per_token']:>7.3f}"
            )


if __name__ == "__main__":
    main()
