"""`dspark eval`: offline acceptance of one or more drafts on the target's own answers, per domain, with paired
comparison; writes JSON (with provenance), a Markdown table and per-position acceptance plots.

    dspark eval --draft default --draft other=path/to/draft --prompts mt_bench humaneval mmath_en --limit 80 \\
        --temperature 0 1 --out results/eval
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .. import pair
from ..provenance import run_provenance
from .offline import DraftAcceptance, offline_acceptance
from .paired import cluster_bootstrap
from .prompt_sets import load_prompt_set

COMMAND = "eval"
HELP = "offline acceptance of drafts on the target's own answers (per domain, paired CIs, plots)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=pair.DEFAULT_TARGET, help="smollm2 (default) or a HF model path")
    parser.add_argument(
        "--draft",
        action="append",
        default=None,
        help="PATH, NAME=PATH or `default` (repeatable; the first two are compared)",
    )
    parser.add_argument(
        "--prompts",
        nargs="+",
        default=["mt_bench", "humaneval", "mmath_en"],
        help="built-in sets (mt_bench, humaneval, mmath_en) or JSONL files",
    )
    parser.add_argument("--limit", type=int, default=80, help="prompts per set")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, nargs="+", default=[0.0])
    parser.add_argument("--max-draft-tokens", type=int, default=None, help="K: draft at most K tokens per round")
    parser.add_argument("--confidence-threshold", type=float, default=0.0, help="0 disables the early stop")
    parser.add_argument("--batch-size", type=int, default=64, help="batch for generating the target's answers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", required=True)


def named_drafts(specs: list[str] | None) -> dict[str, str]:
    named = {}
    for spec in specs or [pair.DEFAULT_DRAFT]:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name or spec, spec
        if name in named:
            raise ValueError(f"dspark eval: two drafts are called {name!r}; name them with NAME=PATH.")
        named[name] = path
    return named


def target_continuations(
    target,
    tokenizer,
    prompt_sets: list[str],
    work: Path,
    limit: int,
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
) -> list[dict]:
    """The target's own answers to each prompt set (cached under `work`; rerunning reuses them)."""
    from ..train.responses import generate_responses, load_response_dataset

    records = []
    for name in prompt_sets:
        prompts = load_prompt_set(name, limit=limit)
        folder = work / f"{Path(name).stem}_T{temperature:g}"
        generate_responses(
            target,
            tokenizer,
            prompts,
            folder,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            max_prompt_tokens=2048,
            temperature=temperature,
            seed=1,
            progress=False,
            allow_evaluation_prompts=True,
        )
        records += load_response_dataset(folder, min_sequences=1, for_training=False)
    return records


def acceptance_report(results: dict[str, DraftAcceptance], domains: list[str]) -> dict:
    return {
        name: {"all": result.summary(), **{domain: result.summary(domain) for domain in domains}}
        for name, result in results.items()
    }


def paired_report(results: dict[str, DraftAcceptance], a: str, b: str, domains: list[str]) -> dict:
    """B against A, overall and per domain, on the same sequences."""
    report = {"a": a, "b": b}
    for domain in [None, *domains]:
        first = [s for s in results[a].sequences if domain is None or s.domain == domain]
        second = [s for s in results[b].sequences if domain is None or s.domain == domain]
        report[domain or "all"] = cluster_bootstrap(
            [s.chain_tokens for s in first],
            [s.chain_rounds for s in first],
            [s.chain_tokens for s in second],
            [s.chain_rounds for s in second],
        )
    return report


def markdown_table(report: dict, domains: list[str]) -> str:
    lines = []
    for key, section in report.items():
        if not key.startswith("T"):
            continue
        lines += [
            f"### temperature {key[1:]}",
            "",
            "| draft | " + " | ".join([*domains, "all"]) + " |",
            "|---" * (len(domains) + 2) + "|",
        ]
        for name, per_domain in section["acceptance"].items():
            cells = [per_domain[d]["acceptance_length"] for d in [*domains, "all"]]
            lines.append(f"| {name} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |")
        paired = section.get("paired")
        if paired:
            overall = paired["all"]
            low, high = overall["relative_gain_ci"]
            lines += [
                "",
                f"{paired['b']} vs {paired['a']}: {overall['relative_gain']:+.1%} "
                f"(95% CI {low:+.1%} .. {high:+.1%}); {overall['verdict']}.",
            ]
        lines.append("")
    return "\n".join(lines)


def plot_per_position(report: dict, out: Path) -> list[Path]:
    """One PNG per temperature: conditional acceptance of each slot, one line per draft."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("dspark eval: matplotlib is not installed; skipping plots (pip install matplotlib)")
        return []
    written = []
    for key, section in report.items():
        if not key.startswith("T"):
            continue
        figure, axis = plt.subplots(figsize=(6, 4))
        for name, per_domain in section["acceptance"].items():
            values = per_domain["all"].get("per_position_acceptance") or []
            axis.plot(
                range(1, len(values) + 1), [v if v is not None else float("nan") for v in values], "o-", label=name
            )
        axis.set(
            xlabel="drafted position",
            ylabel="P(accepted | earlier accepted)",
            ylim=(0, 1),
            title=f"per-position acceptance, temperature {key[1:]}",
        )
        axis.legend()
        path = out / f"per_position_{key}.png"
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target, tokenizer = pair.load_target(args.target, args.device, args.dtype)
    if tokenizer is None:
        raise ValueError(f"dspark eval: the target {args.target} has no tokenizer to build its answers with.")
    drafts = {name: pair.load_draft(path, target) for name, path in named_drafts(args.draft).items()}
    report = {
        "provenance": run_provenance(args.device),
        "drafts": named_drafts(args.draft),
        "settings": {k: v for k, v in vars(args).items() if k != "run"},
    }
    domains: list[str] = []
    for temperature in args.temperature:
        sequences = target_continuations(
            target,
            tokenizer,
            args.prompts,
            out / "continuations",
            args.limit,
            temperature,
            args.max_new_tokens,
            args.batch_size,
        )
        domains = sorted({s["domain"] for s in sequences})
        results = offline_acceptance(
            target,
            drafts,
            sequences,
            temperature=temperature,
            max_draft_tokens=args.max_draft_tokens,
            confidence_threshold=args.confidence_threshold,
            progress=True,
        )
        key = f"T{temperature:g}"
        report[key] = {"sequences": len(sequences), "acceptance": acceptance_report(results, domains)}
        if len(drafts) >= 2:
            first, second = list(drafts)[:2]
            report[key]["paired"] = paired_report(results, first, second, domains)
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    table = markdown_table(report, domains)
    (out / "eval.md").write_text(table)
    plot_per_position(report, out)
    print(table)
    return 0
