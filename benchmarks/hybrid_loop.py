"""What a hybrid (Qwen3.5-style Gated-DeltaNet + attention) target costs in our loops, batch by batch (issue #3,
item 2: "then cost").

    python3 benchmarks/hybrid_loop.py --out $OUT                                      # Qwen3.5-9B shape, one GPU
    python3 benchmarks/hybrid_loop.py --preset tiny-hybrid --device cpu --out /tmp/hl # smoke run on a CPU, seconds

A random-weight target of transformers' Qwen3.5 text architecture (cost_model.py's `qwen3.5-9b` preset is
`Qwen3_5TextConfig()`'s shape: hidden 4096, 32 layers, three Gated DeltaNet layers per full-attention one) and a
random 1-layer DSpark draft, on random prompts. Per batch size, interleaved ABBA (the method list forward, then
backward), each method's wall time per generated token:

  plain                 `target.generate` (DynamicCache, eager): the baseline
  loop                  `speculative_generate`, the dynamic loop: snapshot the linear states, verify, replay the kept
                        tokens of rows that rejected part of the block (one forward per distinct kept length)
  loop_static           `speculative_generate(static_cache=True)`: the verify step keeps the block's keys, corrected
                        values and decays, and the next one first moves each row to its state after its kept tokens
                        (no replay); CUDA graphs on a GPU
  loop_static_compiled  the same with `compile_steps=True` (first call per batch size compiles, untimed)
  decode_static_compiled
                        plain decoding through that compiled graph path (`generate_static(draft_tokens=0)`): what a
                        speculative round must beat
  loop_static_skinny, decode_static_skinny
                        the two compiled methods with `skinny_kernels=True` (projections through dspark's Triton
                        kernels; products of more rows than `dspark.skinny_linear.MAX_ROWS` allows keep cuBLAS)

and each loop's round split into its phases (host clock: draft, verify, rollback = snapshot + replay, commit; the
static path has no rollback phase, its commit runs inside the verify step). With both compiled methods, the report
predicts the speedup of speculation over plain decoding on the same path at acceptance lengths tau (for the kernel
pair too):
tau x (decode ms per token) / (loop ms per round).

Random weights accept nothing, so every round verifies Q tokens and keeps one per row: for the dynamic loop that is
the rollback's worst case (a replay every round), for the static path a round at acceptance length 1. Real
acceptance needs real weights, which are not available offline. Whether flash-linear-attention and causal-conv1d
(transformers' fast GDN kernels, used by the prefill and the dynamic loop) were importable is recorded.
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
import loop_graphs  # noqa: E402

from dspark.provenance import run_provenance  # noqa: E402
from dspark.speculative import speculative_generate  # noqa: E402

HYBRID_PRESETS = sorted(name for name, preset in cost_model.PRESETS.items() if preset.architecture == "qwen3_5")
METHODS = (
    "plain", "loop", "loop_static", "loop_static_compiled", "decode_static_compiled", "loop_static_skinny",
    "decode_static_skinny",
)  # fmt: skip
TAUS = (1.0, 2.0, 3.0, 4.0, 5.0)
PHASES = ("draft", "verify", "rollback", "commit")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for hybrid_loop.json")
    parser.add_argument("--preset", choices=HYBRID_PRESETS, default="qwen3.5-9b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="ABBA pairs per batch size")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def method_runs(target, draft, tokens: int, methods: list[str]) -> dict:
    """name -> a call on prompts [B, P] returning (SpeculativeOutput or sequences)."""

    def plain(ids):
        return target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False)

    def loop(**static):
        def run(ids):
            return speculative_generate(
                target, draft, ids, max_new_tokens=tokens, eos_token_id=[], return_stats=True, **static
            )

        return run

    # loop_graphs' plain decoding through the compiled graph path (it returns the first row's tokens; all rows run)
    graph_path = loop_graphs.methods(target, draft, set(), tokens, use_graphs=target.device.type == "cuda")
    runs = {
        "plain": plain,
        "loop": loop(),
        "loop_static": loop(static_cache=True),
        "loop_static_compiled": loop(static_cache=True, compile_steps=True),
        "decode_static_compiled": graph_path["decode_graph_compiled"],
        "loop_static_skinny": loop(static_cache=True, compile_steps=True, skinny_kernels=True),
        "decode_static_skinny": graph_path["decode_graph_skinny"],
    }
    return {name: runs[name] for name in methods}


def measure_batch(target, draft, batch: int, args, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(args.seed + batch)
    ids = torch.randint(0, target.config.vocab_size, (batch, args.prompt_length), generator=generator).to(device)
    tokens = args.max_new_tokens
    runs = method_runs(target, draft, tokens, args.methods)
    for run in runs.values():  # warm-up: allocator, kernels, lazy initialisations, graph capture, compiling
        loop_graphs.timed(run, ids, device)
    seconds = {name: [] for name in runs}
    loops = [name for name in runs if name.startswith("loop")]
    phases = {name: {phase: [] for phase in PHASES} for name in loops}
    rounds, acceptance = {name: [] for name in loops}, {name: [] for name in loops}
    for repeat in range(args.repeats):
        for name in list(runs) if repeat % 2 == 0 else list(runs)[::-1]:
            result, elapsed = loop_graphs.timed(runs[name], ids, device)
            seconds[name].append(elapsed)
            if name in loops:
                stats = result.stats
                # loop iterations = the longest-running row's rounds (stats count a round once per row taking part)
                count = max(max(len(row["acceptance_lengths"]) for row in stats["per_row"]), 1)
                rounds[name].append(count)
                acceptance[name].append(stats["mean_acceptance_length"])
                for phase in PHASES:
                    phases[name][phase].append(1e3 * stats["seconds"][phase] / count)
    ms = {name: 1e3 * statistics.median(values) / tokens for name, values in seconds.items()}
    entry = {
        "batch": batch,
        "ms_per_token_step": ms,  # wall / new tokens per row
        "tokens_per_second": {name: batch * 1e3 / value for name, value in ms.items()},
        "samples_seconds": seconds,
    }
    if "plain" in runs:
        entry["speedup_vs_plain"] = {
            name: {
                "median": ms["plain"] / ms[name],
                "paired": [p / q for p, q in zip(seconds["plain"], seconds[name])],
            }
            for name in runs
            if name != "plain"
        }
    for name in loops:
        round_phases = {phase: statistics.median(values) for phase, values in phases[name].items()}
        entry[name] = {
            "rounds_per_call": statistics.median(rounds[name]),
            "mean_acceptance_length": statistics.median(acceptance[name]),
            "ms_per_round": round_phases,
            "ms_per_round_wall": 1e3 * statistics.median(seconds[name]) / statistics.median(rounds[name]),
            "rollback_share_of_round": round_phases["rollback"] / max(sum(round_phases.values()), 1e-12),
        }
    for kind in ("compiled", "skinny"):
        if {f"loop_static_{kind}", f"decode_static_{kind}"} <= set(runs):
            round_ms = entry[f"loop_static_{kind}"]["ms_per_round_wall"]
            entry[f"predicted_speedup_over_decode_static_{kind}"] = {
                str(tau): tau * ms[f"decode_static_{kind}"] / round_ms for tau in TAUS
            }
    return entry


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    preset = cost_model.PRESETS[args.preset]
    target = cost_model.build_target(preset.target, device, getattr(torch, preset.dtype), preset.architecture)
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
