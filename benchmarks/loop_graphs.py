"""Batch-1 speed of our loop's static-cache + CUDA-graph path (issue #3, item 3) against HF generate and our eager loop.

    python3 benchmarks/loop_graphs.py --out $OUT                               # SmolLM2 + default draft, Qwen3-8B shape
    python3 benchmarks/loop_graphs.py --targets smollm2 --out $OUT
    python3 benchmarks/loop_graphs.py --targets qwen3.5-9b --out $OUT                # hybrid target, batch 1
    python3 benchmarks/loop_graphs.py --targets tiny --device cpu --out /tmp/lg  # smoke run on a CPU, seconds

Targets: `smollm2` is the real SmolLM2-135M-Instruct with the embedded default draft (`dspark.pair.load_pair`) on
chat prompts of the built-in prompt sets; `qwen3-8b` (and `tiny`) is the random-weight target of
benchmarks/cost_model.py with a random 1-layer draft on random prompts (no real acceptance: it measures costs);
`qwen3.5-9b` (and `tiny-hybrid`) the same for a hybrid Qwen3.5 target (Gated DeltaNet + attention), whose static path
commits each row's linear-attention state inside the next verify step.

Methods, batch 1, greedy, the same prompts, interleaved ABBA (method list forward, then backward, alternating):
  hf_generate        plain `target.generate` (DynamicCache, eager): the baseline
  loop_dynamic       `speculative_generate` (DynamicCache, eager), as shipped
  loop_static_eager  `speculative_generate(static_cache=True, cuda_graphs=False)`: the cache alone
  loop_static        `speculative_generate(static_cache=True)`: draft and verify steps replayed from CUDA graphs
  decode_graph       plain decoding through the same graph path (`generate_static(draft_tokens=0)`, no draft)
  loop_static_compiled, decode_graph_compiled
                     the same two with `compile_steps=True`: the steps run through torch.compile (inductor fuses the
                     small kernels) before graph capture; the first call per setting compiles (tens of seconds,
                     untimed: it happens in the warm-up)
  loop_static_skinny, decode_graph_skinny
                     the compiled two with `skinny_kernels=True`: the verify step's projections through
                     dspark.skinny_linear's weight-streaming Triton kernels instead of cuBLAS
Per method: ms per new token (median, quartiles), and per (prompt, repeat) the speedup over hf_generate.
Phases of the graph path (CUDA events on the warm runner): draft-step replay, verify-step replay, the eager accept
step with its host read-back, and the per-round overhead: round wall time - (draft + verify).
Checks: token identity of each method's output with hf_generate's, and of loop_static with loop_static_eager (the
graph must replay exactly what the eager static step computes).
Targets of issue #3: decode_graph >= 5x hf_generate; per-round overhead < 10%; verify within 1.5x of its roofline.
Batches of the same paths are timed by `dspark bench --methods plain,loop,loop_static,loop_static_compiled
--batch-sizes 1 4 16 32` (scripts/device/smollm2_pipeline.sh speed runs both).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LogitsProcessorList

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import cost_model  # noqa: E402

from dspark import pair, static_loop  # noqa: E402
from dspark.evaluation.bench import synchronize  # noqa: E402
from dspark.evaluation.prompt_sets import BUILTIN_PROMPT_SETS, load_prompt_set  # noqa: E402
from dspark.provenance import run_provenance  # noqa: E402
from dspark.speculative import speculative_generate  # noqa: E402

METHODS = (
    "hf_generate",
    "loop_dynamic",
    "loop_static_eager",
    "loop_static",
    "decode_graph",
    "loop_static_compiled",
    "decode_graph_compiled",
    "loop_static_skinny",
    "decode_graph_skinny",
)
# The graph-path methods whose warm runner gets its phases timed: (method, draft tokens, compiled steps, kernels).
PHASED = (
    ("loop_static", None, False, False),
    ("decode_graph", 0, False, False),
    ("loop_static_compiled", None, True, False),
    ("decode_graph_compiled", 0, True, False),
    ("loop_static_skinny", None, True, True),
    ("decode_graph_skinny", 0, True, True),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for loop_graphs.json")
    parser.add_argument(
        "--targets", nargs="+", default=["smollm2", "qwen3-8b"], choices=["smollm2", *sorted(cost_model.PRESETS)]
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--draft", default="default", help="draft for smollm2 (default: the embedded one)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--prompts", type=int, default=3, help="prompts per target")
    parser.add_argument("--repeats", type=int, default=2, help="ABBA repeats per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--random-max-new-tokens", type=int, default=64, help="for the random-weight targets")
    parser.add_argument("--random-prompt-length", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=8, help="random draft's block")
    parser.add_argument("--phase-repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# Targets and prompts
# ----------------------------------------------------------------------------------------------------------------


def smollm2_setup(args) -> tuple:
    """(target, draft, prompts [1, P] each, stop ids) for the real pair on chat prompts, one per domain in turn."""
    target, tokenizer, draft = pair.load_pair("smollm2", args.draft, device=args.device, dtype="auto")
    records = [r for name in BUILTIN_PROMPT_SETS for r in load_prompt_set(name)[-args.prompts :]]
    records = [records[(i % 3) * args.prompts + i // 3] for i in range(args.prompts)]  # alternate the domains
    prompts = []
    for record in records:
        chat = [{"role": "user", "content": record["turns"][0]}]
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        prompts.append(ids["input_ids"].to(args.device))
    eos = target.generation_config.eos_token_id
    return target, draft, prompts, set(eos if isinstance(eos, list) else [eos]), args.max_new_tokens


def random_setup(args, preset_name: str) -> tuple:
    """(target, draft, prompts, no stop ids) for cost_model's random-weight target of `preset_name`."""
    preset = cost_model.PRESETS[preset_name]
    dtype = getattr(torch, preset.dtype)
    target = cost_model.build_target(preset.target, torch.device(args.device), dtype, preset.architecture)
    draft = cost_model.build_draft(target, 1, args.block_size, preset.markov_rank)
    generator = torch.Generator().manual_seed(args.seed)
    vocab = preset.target["vocab_size"]
    prompts = [
        torch.randint(0, vocab, (1, args.random_prompt_length), generator=generator).to(args.device)
        for _ in range(args.prompts)
    ]
    return target, draft, prompts, set(), args.random_max_new_tokens


# ----------------------------------------------------------------------------------------------------------------
# Methods: each returns the new tokens of one batch-1 call
# ----------------------------------------------------------------------------------------------------------------


def methods(target, draft, stop_ids: set[int], max_new_tokens: int, use_graphs: bool) -> dict[str, Callable]:
    eos = sorted(stop_ids) or None
    pad = eos[0] if eos else 0

    def hf_generate(ids):
        out = target.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=eos, pad_token_id=pad,
        )  # fmt: skip
        return out[0, ids.shape[1] :].tolist()

    def loop(static: bool, graphs: bool, compiled: bool = False, skinny: bool = False):
        def run(ids):
            out = speculative_generate(
                target, draft, ids, max_new_tokens=max_new_tokens, eos_token_id=eos or [], return_stats=True,
                static_cache=static, cuda_graphs=graphs if static else None, compile_steps=compiled,
                skinny_kernels=skinny,
            )  # fmt: skip
            return out.generated[0]

        return run

    def decode_graph(compiled: bool, skinny: bool = False):
        def run(ids):
            generated, _, _ = static_loop.generate_static(
                target, draft, ids, torch.ones_like(ids), max_new_tokens, False, LogitsProcessorList(), stop_ids,
                None, use_graphs, (False, 1.0, None, None), draft_tokens=0, compile_steps=compiled,
                skinny_kernels=skinny,
            )  # fmt: skip
            return generated[0]

        return run

    return {
        "hf_generate": hf_generate,
        "loop_dynamic": loop(False, False),
        "loop_static_eager": loop(True, False),
        "loop_static": loop(True, use_graphs),
        "decode_graph": decode_graph(compiled=False),
        "loop_static_compiled": loop(True, use_graphs, compiled=True),
        "decode_graph_compiled": decode_graph(compiled=True),
        "loop_static_skinny": loop(True, use_graphs, compiled=True, skinny=True),
        "decode_graph_skinny": decode_graph(compiled=True, skinny=True),
    }


def until_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    """Tokens up to and including the first stop token (HF generate pads after it)."""
    for index, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: index + 1]
    return tokens


def timed(run: Callable, ids: torch.Tensor, device: torch.device) -> tuple[list[int], float]:
    synchronize(device)
    started = time.perf_counter()
    tokens = run(ids)
    synchronize(device)
    return tokens, time.perf_counter() - started


# ----------------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------------


def warm_up(runs: dict, ids, device, stop_ids) -> tuple[dict, dict, dict]:
    """One untimed call per method (graph capture happens here); methods that fail are dropped, with the error."""
    seconds, errors, outputs = {}, {}, {}
    for name, run in list(runs.items()):
        try:
            tokens, elapsed = timed(run, ids, device)
            seconds[name], outputs[name] = elapsed, until_stop(tokens, stop_ids)
        except Exception as error:  # a method that cannot run is a result, not a crash of the whole benchmark
            errors[name] = f"{type(error).__name__}: {str(error)[:600]}"
            traceback.print_exc()
            del runs[name]
    return seconds, errors, outputs


def abba(runs: dict, prompts: list, repeats: int, device, stop_ids) -> tuple[dict, list[dict]]:
    """ms per new token for every (prompt, repeat) and method; the order flips every call pair to cancel drift."""
    names = list(runs)
    samples = {name: [] for name in names}
    outputs = []
    for index, ids in enumerate(prompts):
        first_outputs = {}
        for repeat in range(repeats):
            order = names if (index + repeat) % 2 == 0 else names[::-1]
            for name in order:
                tokens, seconds = timed(runs[name], ids, device)
                tokens = until_stop(tokens, stop_ids)
                samples[name].append(1e3 * seconds / max(len(tokens), 1))
                first_outputs.setdefault(name, tokens)
        outputs.append(first_outputs)
        print(f"  prompt {index}: " + ", ".join(f"{n} {samples[n][-1]:.2f} ms/token" for n in names), flush=True)
    return samples, outputs


def summary(samples: dict[str, list[float]]) -> dict:
    """Per method: median and quartiles of ms/token; paired speedups over hf_generate and over loop_dynamic."""
    report = {}
    for name, values in samples.items():
        q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
        entry = {"median_ms_per_token": median, "q1": q1, "q3": q3, "samples": values}
        for baseline in ("hf_generate", "loop_dynamic"):
            if baseline in samples and name != baseline:
                ratios = [b / v for b, v in zip(samples[baseline], values)]
                entry[f"speedup_vs_{baseline}"] = {
                    "median": statistics.median(ratios),
                    "min": min(ratios),
                    "max": max(ratios),
                }
        report[name] = entry
    return report


def identity_checks(outputs: list[dict]) -> dict:
    """Per prompt: does each method emit hf_generate's tokens, and does the graph replay the eager static step?"""
    checks = {}
    for name in outputs[0]:
        if name != "hf_generate" and "hf_generate" in outputs[0]:
            checks[f"{name}_equals_hf_generate"] = [o[name] == o["hf_generate"] for o in outputs]
    if "loop_static" in outputs[0] and "loop_static_eager" in outputs[0]:
        checks["graph_equals_eager_static"] = [o["loop_static"] == o["loop_static_eager"] for o in outputs]
    if "loop_static_compiled" in outputs[0] and "loop_static_eager" in outputs[0]:
        checks["compiled_equals_eager_static"] = [o["loop_static_compiled"] == o["loop_static_eager"] for o in outputs]
    return checks


def runner_of(draft, draft_tokens: int | None, use_graphs: bool, compiled: bool, skinny: bool):
    wanted = (use_graphs, draft_tokens, compiled, skinny)
    for runner in static_loop._RUNNERS.get(draft, {}).values():
        if (runner.use_graphs, runner.draft_tokens, runner.compile_steps, runner.skinny_kernels) == wanted:
            return runner
    return None


@torch.no_grad()
def phases(runner, ids: torch.Tensor, device: torch.device, repeats: int) -> dict:
    """Time the warm runner's steps in place: draft and verify are idempotent replays; accept advances the state, so
    its inputs are restored before every call. The state is first reset to the prompt (a safe cache position)."""
    b = runner.buffers
    runner.prefill(ids, torch.ones_like(ids))
    b.kept.fill_(1)  # pretend the context holds one kept entry: fixed-shape steps from position P on
    saved = [t.clone() for t in (b.length, b.kept, b.anchor, b.context)]

    def restore() -> None:
        for buffer, value in zip((b.length, b.kept, b.anchor, b.context), saved):
            buffer.copy_(value)

    result = {}
    steps = {"verify": (runner.verify_step, restore), "accept": (lambda: runner.accept(None), restore)}
    if runner.count > 0:
        steps = {"draft": (runner.draft_step, restore), **steps}
    for name, (run, reset) in steps.items():
        result[name] = cost_model.summarize(cost_model.time_calls(run, reset, device, 3, repeats))
    return result


def round_time(target, draft, ids, max_new_tokens: int, stop_ids, use_graphs: bool, compiled: bool, skinny: bool):
    """Wall ms per round of one loop_static call (prefill excluded), with its rounds and acceptance."""
    eos = sorted(stop_ids) or []
    out = speculative_generate(
        target, draft, ids, max_new_tokens=max_new_tokens, eos_token_id=eos, return_stats=True, static_cache=True,
        cuda_graphs=use_graphs, compile_steps=compiled, skinny_kernels=skinny,
    )  # fmt: skip
    seconds = out.stats["seconds"]
    rounds = max(out.stats["rounds"], 1)
    return {
        "ms_per_round": 1e3 * (seconds["total"] - seconds["prefill"]) / rounds,
        "rounds": out.stats["rounds"],
        "mean_acceptance_length": out.stats["mean_acceptance_length"],
        "host_seconds": seconds,
    }


def measure_target(name: str, args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    setup = smollm2_setup(args) if name == "smollm2" else random_setup(args, name)
    target, draft, prompts, stop_ids, max_new_tokens = setup
    use_graphs = device.type == "cuda"
    all_runs = methods(target, draft, stop_ids, max_new_tokens, use_graphs)
    runs = {method: all_runs[method] for method in args.methods}
    print(f"{name}: warm-up (graph capture)", flush=True)
    # the longest prompt sizes the static caches for all prompts: one graph capture per method, before any timing
    longest = max(prompts, key=lambda ids: ids.shape[1])
    warm_seconds, errors, _ = warm_up(runs, longest, device, stop_ids)
    samples, outputs = abba(runs, prompts, args.repeats, device, stop_ids)
    report = {
        "settings": {
            "max_new_tokens": max_new_tokens,
            "prompt_lengths": [p.shape[1] for p in prompts],
            "repeats": args.repeats,
            "dtype": str(target.dtype),
            "draft_block_size": draft.config.block_size,
            "draft_layers": draft.config.num_hidden_layers,
            "cuda_graphs": use_graphs,
        },
        "warm_up_seconds": warm_seconds,
        "errors": errors,
        "methods": summary(samples),
        "checks": identity_checks(outputs),
    }
    goals = {}
    for method, draft_tokens, compiled, skinny in PHASED:
        runner = runner_of(draft, draft_tokens, use_graphs, compiled, skinny)
        if runner is None or method not in runs:
            continue
        suffix = "_skinny" if skinny else "_compiled" if compiled else ""
        entry = {"phases_ms": phases(runner, prompts[0], device, args.phase_repeats)}
        if draft_tokens is None:
            entry["round"] = round_time(
                target, draft, prompts[0], max_new_tokens, stop_ids, use_graphs, compiled, skinny
            )
            steps = sum(entry["phases_ms"][step]["median_ms"] for step in ("draft", "verify"))
            entry["round_overhead_fraction"] = 1 - steps / entry["round"]["ms_per_round"]
            entry["verify_roofline"] = cost_model.forward_roofline(target, runner.max_len, device)
            if entry["verify_roofline"]:
                verify_ms = entry["phases_ms"]["verify"]["median_ms"]
                goals[f"verify_vs_roofline{suffix} (goal <= 1.5)"] = verify_ms / entry["verify_roofline"]["roofline_ms"]
            goals[f"round_overhead_fraction{suffix} (goal < 0.10)"] = entry["round_overhead_fraction"]
        entry["graphs_captured"] = {
            "draft": runner.draft_step.graph is not None if runner.count > 0 else "no draft step (plain decoding)",
            "verify": runner.verify_step.graph is not None,
            "failures": [step.failure for step in (runner.draft_step, runner.verify_step) if step.failure],
        }
        report[f"{method}_phases"] = entry
    for method, label in (
        ("decode_graph", " (goal >= 5)"),
        ("decode_graph_compiled", " (goal >= 5)"),
        ("loop_static", ""),
        ("loop_static_compiled", ""),
        ("decode_graph_skinny", " (goal >= 5)"),
        ("loop_static_skinny", ""),
    ):
        speedup = report["methods"].get(method, {}).get("speedup_vs_hf_generate")
        if speedup:
            goals[f"{method}_speedup_vs_hf_generate{label}"] = speedup["median"]
    report["goals"] = goals
    print(json.dumps({"target": name, "goals": goals, "checks": report["checks"], "errors": errors}), flush=True)
    return report


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report = {"provenance": run_provenance(args.device), "targets": {}}
    for name in args.targets:
        try:
            report["targets"][name] = measure_target(name, args)
        except Exception as error:  # keep the other target's results
            traceback.print_exc()
            report["targets"][name] = {"error": f"{type(error).__name__}: {str(error)[:1000]}"}
        report["wall_seconds"] = time.perf_counter() - started
        (out / "loop_graphs.json").write_text(json.dumps(report, indent=1))  # after each target: survives a timeout
        static_loop._RUNNERS.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return report


if __name__ == "__main__":
    main()
