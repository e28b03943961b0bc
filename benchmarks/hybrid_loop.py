"""What a hybrid (Qwen3.5-style Gated-DeltaNet + attention) target costs in our loop (issue #3, item 2: "then cost").

    python3 benchmarks/hybrid_loop.py --out $OUT                               # Qwen3.5-9B shape, bf16, one GPU
    python3 benchmarks/hybrid_loop.py --preset tiny --device cpu --out /tmp/hl # smoke run on a CPU, seconds

A random-weight target of transformers' Qwen3.5 text architecture (the `qwen3.5-9b` preset is
`Qwen3_5TextConfig()`'s defaults: hidden 4096, 32 layers, 3 linear-attention layers per full-attention one) and a
random 1-layer DSpark draft, on random prompts. Per batch size, interleaved ABBA: plain `target.generate` against
`speculative_generate` (our dynamic loop, the one hybrid targets run), with our loop's wall time split into its
phases (draft, verify, rollback = state snapshot + replay, commit) per round.

Random weights accept nothing, so every round verifies Q tokens, then replays one token for every row (the rows
share that replay): the rollback's worst case relative to the verify, and the cost of a round at acceptance length 1.
Real acceptance needs real weights, which are not available offline. Whether flash-linear-attention and
causal-conv1d (transformers' fast GDN kernels) were importable is recorded: without them transformers runs its
reference PyTorch kernels.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import cost_model  # noqa: E402
from loop_graphs import timed  # noqa: E402

from dspark.provenance import run_provenance  # noqa: E402
from dspark.speculative import speculative_generate  # noqa: E402

PRESETS = {
    "qwen3.5-9b": {"dtype": "bfloat16", "shape": {}},  # Qwen3_5TextConfig's defaults
    "tiny": {
        "dtype": "float32",
        "shape": dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=2,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        ),
    },
}
PHASES = ("draft", "verify", "rollback", "commit")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for hybrid_loop.json")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen3.5-9b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="ABBA pairs per batch size")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_target(preset: dict, device: torch.device):
    """A random-weight Qwen3.5 text model created on `device` in the preset's dtype."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    config = Qwen3_5TextConfig(
        **preset["shape"], initializer_range=0.02, bos_token_id=None, eos_token_id=None, pad_token_id=None
    )
    with torch.device(device):
        target = Qwen3_5ForCausalLM._from_config(config, dtype=getattr(torch, preset["dtype"]))
    return target.eval()


def measure_batch(target, draft, batch: int, args, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(args.seed + batch)
    ids = torch.randint(0, target.config.vocab_size, (batch, args.prompt_length), generator=generator).to(device)
    tokens = args.max_new_tokens

    def plain(ids):
        return target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False)

    def loop(ids):
        return speculative_generate(target, draft, ids, max_new_tokens=tokens, eos_token_id=[], return_stats=True)

    runs = {"plain": plain, "loop": loop}
    for run in runs.values():  # warm-up: allocator, kernels, lazy initialisations
        timed(run, ids, device)
    seconds = {name: [] for name in runs}
    phases = {phase: [] for phase in PHASES}
    rounds, acceptance = [], []
    for repeat in range(args.repeats):
        for name in list(runs) if repeat % 2 == 0 else list(runs)[::-1]:
            result, elapsed = timed(runs[name], ids, device)
            seconds[name].append(elapsed)
            if name == "loop":
                stats = result.stats
                # loop iterations = the longest-running row's rounds (stats count a round once per row taking part)
                count = max(max(len(row["acceptance_lengths"]) for row in stats["per_row"]), 1)
                rounds.append(count)
                acceptance.append(stats["mean_acceptance_length"])
                for phase in PHASES:
                    phases[phase].append(1e3 * stats["seconds"][phase] / count)
    plain_ms = 1e3 * statistics.median(seconds["plain"]) / tokens
    loop_ms = 1e3 * statistics.median(seconds["loop"]) / tokens
    round_phases = {phase: statistics.median(values) for phase, values in phases.items()}
    return {
        "batch": batch,
        "ms_per_token_step": {"plain": plain_ms, "loop": loop_ms},  # wall / new tokens per row
        "tokens_per_second": {"plain": batch * 1e3 / plain_ms, "loop": batch * 1e3 / loop_ms},
        "loop_vs_plain": plain_ms / loop_ms,
        "paired_ratios": [p / q for p, q in zip(seconds["plain"], seconds["loop"])],
        "rounds_per_call": statistics.median(rounds),
        "mean_acceptance_length": statistics.median(acceptance),
        "loop_ms_per_round": round_phases,
        "rollback_share_of_round": round_phases["rollback"] / max(sum(round_phases.values()), 1e-12),
        "samples_seconds": seconds,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    preset = PRESETS[args.preset]
    target = build_target(preset, device)
    draft = cost_model.build_draft(target, 1, args.block_size, 64)
    report = {
        "provenance": run_provenance(args.device),
        "settings": {key: value for key, value in vars(args).items() if key != "out"},
        "fast_gdn_kernels": {name: importlib.util.find_spec(name) is not None for name in ("fla", "causal_conv1d")},
        "batches": [],
    }
    for batch in args.batch_sizes:
        try:
            entry = measure_batch(target, draft, batch, args, device)
        except Exception as error:  # e.g. out of memory at a large batch: keep the others
            entry = {"batch": batch, "error": f"{type(error).__name__}: {str(error)[:600]}"}
        report["batches"].append(entry)
        (out / "hybrid_loop.json").write_text(json.dumps(report, indent=1))
        print(json.dumps({k: v for k, v in entry.items() if k != "samples_seconds"}), flush=True)
    return report


if __name__ == "__main__":
    main()
