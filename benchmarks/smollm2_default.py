"""Evaluate trained SmolLM2 drafts on the GPU: offline acceptance per domain, paired comparison, batch-1 speedup.

    python3 benchmarks/smollm2_default.py --draft dspark=/tmp/dspark_runs/dspark-1L/final \
        --draft dflash=/tmp/dspark_runs/dflash-1L/final --ship dspark --out $OUT

Acceptance: the target's greedy (T=0) and sampled (T=1) answers to MT-bench, HumanEval and MMATH-en prompts (first
--limit of each), scored offline (`dspark.evaluation.offline`): T=0 replays the speculative loop exactly; T=1 is
the teacher-forced expectation. Speed: plain `target.generate`, `target.generate(assistant_model=draft)` and our own
loop, batch 1, the three methods interleaved per prompt with a rotating order; medians of per-prompt ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dspark import pair  # noqa: E402
from dspark.evaluation.continuations import target_continuations  # noqa: E402
from dspark.evaluation.offline import offline_acceptance  # noqa: E402
from dspark.evaluation.paired import compare_arms  # noqa: E402
from dspark.evaluation.prompt_sets import BUILTIN_PROMPT_SETS, load_prompt_set  # noqa: E402
from dspark.provenance import run_provenance  # noqa: E402
from dspark.speculative import speculative_generate  # noqa: E402


def continuations(target, tokenizer, work: Path, limit: int, temperature: float, max_new_tokens: int) -> list[dict]:
    records, _ = target_continuations(
        target,
        tokenizer,
        list(BUILTIN_PROMPT_SETS),
        limit=limit,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        cache_root=work,
        batch_size=256,
        progress=False,
    )
    return records


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(function):
    synchronize()
    started = time.perf_counter()
    result = function()
    synchronize()
    return result, time.perf_counter() - started


def speed_report(target, tokenizer, draft, prompts: list[dict], max_new_tokens: int) -> dict:
    """Batch-1 greedy generation of each prompt by three methods, interleaved with a rotating order."""
    from dspark.targets import chat_prompt

    methods = {
        "plain": lambda ids: target.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1] :],
        "assisted": lambda ids: target.generate(
            ids, assistant_model=draft, max_new_tokens=max_new_tokens, do_sample=False
        )[0, ids.shape[1] :],
        "loop": lambda ids: speculative_generate(target, draft, ids, max_new_tokens=max_new_tokens)[0, ids.shape[1] :],
    }
    names = list(methods)
    warm = chat_prompt(tokenizer, "Hello!").to(target.device)
    for method in methods.values():
        method(warm)
    rows = []
    for index, record in enumerate(prompts):
        ids = chat_prompt(tokenizer, record["turns"][0]).to(target.device)
        order = names[index % 3 :] + names[: index % 3]
        row = {"id": record["id"], "domain": record["domain"], "order": order}
        outputs = {}
        for name in order:
            tokens, seconds = timed(lambda name=name, ids=ids: methods[name](ids))
            outputs[name] = tokens.tolist()
            row[name] = {"seconds": seconds, "tokens": len(outputs[name])}
        for name in ("assisted", "loop"):
            row[name]["speedup"] = (row[name]["tokens"] / row[name]["seconds"]) / (
                row["plain"]["tokens"] / row["plain"]["seconds"]
            )
            row[name]["identical_to_plain"] = outputs[name] == outputs["plain"]
        rows.append(row)
    summary = {}
    for name in ("assisted", "loop"):
        ratios = sorted(row[name]["speedup"] for row in rows)
        quartiles = statistics.quantiles(ratios, n=4)
        summary[name] = {
            "median_speedup": statistics.median(ratios),
            "speedup_iqr": [quartiles[0], quartiles[2]],
            "min": ratios[0],
            "max": ratios[-1],
            "identical_to_plain": sum(row[name]["identical_to_plain"] for row in rows),
            "prompts": len(rows),
        }
    summary["plain_tokens_per_second_median"] = statistics.median(
        row["plain"]["tokens"] / row["plain"]["seconds"] for row in rows
    )
    return {"summary": summary, "rows": rows}


def save_shippable(draft, out: Path) -> None:
    """bf16 weights in shards under 16 MB, with config, generation config and the remote-code files."""
    draft.to(torch.bfloat16).save_pretrained(out, max_shard_size="15MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", action="append", required=True, help="NAME=PATH (repeatable); first = A")
    parser.add_argument("--ship", help="NAME of the draft to copy to OUT/shipped in bf16")
    parser.add_argument("--limit", type=int, default=80)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--speed-prompts", type=int, default=4, help="per domain")
    parser.add_argument("--speed-tokens", type=int, default=128)
    parser.add_argument("--work", default="/tmp/dspark_eval")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target, tokenizer = pair.load_target("smollm2", args.device, args.dtype)
    drafts = {}
    for spec in args.draft:
        name, _, path = spec.partition("=")
        drafts[name] = pair.load_draft(path, target)
    report = {"provenance": run_provenance(args.device), "drafts": dict(s.split("=", 1) for s in args.draft)}
    for temperature in (0.0, 1.0):
        sequences = continuations(target, tokenizer, Path(args.work), args.limit, temperature, args.max_new_tokens)
        results = offline_acceptance(target, drafts, sequences, temperature=temperature)
        key = f"T{temperature:g}"
        report[key] = {"acceptance": results.summary(), "sequences": len(sequences)}
        if len(drafts) >= 2:
            first, second = list(drafts)[:2]
            report[key]["paired"] = compare_arms(results, first, second)
        print(json.dumps({key: report[key]["acceptance"]}, indent=1)[:3000], flush=True)
    ship = args.ship or next(iter(drafts))
    (out / "results_default.json").write_text(json.dumps(report, indent=1))
    save_shippable(drafts[ship], out / "shipped")
    speed_prompts = [r for name in BUILTIN_PROMPT_SETS for r in load_prompt_set(name)[-args.speed_prompts :]]
    report["speed"] = speed_report(target, tokenizer, drafts[ship], speed_prompts, args.speed_tokens)
    report["speed"]["draft"] = ship
    print(json.dumps(report["speed"]["summary"], indent=1), flush=True)
    (out / "results_default.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
