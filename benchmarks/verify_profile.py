"""Where the time of one verify step goes (issue #3: "report where time goes"), kernel by kernel, on a GPU.

    python3 benchmarks/verify_profile.py --out $OUT/profile                       # Qwen3-8B shape, bf16, batch 1
    python3 benchmarks/verify_profile.py --out $OUT/p --inductor max_autotune_gemm=True
    python3 benchmarks/verify_profile.py --out $OUT/p --variants compiled_skinny --steps verify   # with our kernels
    python3 benchmarks/verify_profile.py --preset tiny --device cpu --out /tmp/vp   # smoke run on a CPU

Builds the static runner of our loop on cost_model's random-weight target (Qwen3-8B shape by default) with a random
1-layer draft, prefills a random prompt, then times the verify step (Q = block_size tokens, and Q = 1: plain
decoding) for each variant: eager kernels replayed from a CUDA graph, the same after `compile_steps` (regional
torch.compile, then a graph), and that with `skinny_kernels` (our projection and attention kernels). For each it
records the replayed step's time (CUDA events, median of repeats), its roofline (weights + KV cache over measured
copy bandwidth), a profiler trace of a few calls of the step run outside the graph summed per kernel class (GEMMs,
attention, fused Triton kernels, copies/indexing, other), and on a GPU the timeline of the graph replay itself as the
profiler sees it: every kernel in order with its time and the idle GPU time before it (`replay`).

`--inductor NAME=VALUE` sets torch._inductor.config options before compiling (e.g. max_autotune_gemm=True,
coordinate_descent_tuning=True) to see what they buy; the JSON records them.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import LogitsProcessorList

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import cost_model  # noqa: E402

from dspark import static_loop  # noqa: E402
from dspark.evaluation.bench import synchronize  # noqa: E402
from dspark.provenance import run_provenance  # noqa: E402

# kernel name patterns, checked in this order; the first that matches names the class
KERNEL_CLASSES = (
    ("attention", re.compile(r"flash|fmha|attention|attn|sdpa", re.I)),
    ("gemm", re.compile(r"gemm|gemv|sm90_|sm80_|cutlass|cublas|nvjet|ampere_|hopper_|splitk|matmul", re.I)),
    ("fused_triton", re.compile(r"^triton_", re.I)),
    ("copy_index", re.compile(r"copy|memcpy|memset|index|scatter|gather|cat|fill", re.I)),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for verify_profile.json")
    parser.add_argument("--preset", choices=sorted(cost_model.PRESETS), default="qwen3-8b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="sizes the static caches")
    variants = ["graph", "compiled", "compiled_skinny"]
    parser.add_argument("--variants", nargs="+", default=["graph", "compiled"], choices=variants)
    parser.add_argument("--steps", nargs="+", default=["verify", "decode"], choices=["verify", "decode"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--profiled-calls", type=int, default=5)
    parser.add_argument("--inductor", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def inductor_options(pairs: list[str]) -> dict:
    """NAME=VALUE strings -> {name: Python value}, checked against torch._inductor.config."""
    import torch._inductor.config as inductor

    options = {}
    for pair in pairs:
        name, _, text = pair.partition("=")
        if not hasattr(inductor, name):
            raise SystemExit(f"--inductor {pair}: torch._inductor.config has no option {name!r}")
        try:
            options[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            options[name] = text
    return options


def kernel_class(name: str) -> str:
    for label, pattern in KERNEL_CLASSES:
        if pattern.search(name):
            return label
    return "other"


def kernel_breakdown(run, device: torch.device, calls: int) -> dict:
    """Profile `calls` calls of `run`: per call, device milliseconds and kernel launches per kernel class, and the
    slowest kernels."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    synchronize(device)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(calls):
            run()
        synchronize(device)
    per_class_us, per_class_count, kernels = defaultdict(float), defaultdict(int), []
    for event in profiler.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if device.type != "cuda" or event.device_type != torch.autograd.DeviceType.CUDA or device_us <= 0:
            continue
        label = kernel_class(event.key)
        per_class_us[label] += device_us / calls
        per_class_count[label] += event.count // calls
        kernels.append((device_us / calls, event.count // calls, label, event.key[:160]))
    kernels.sort(reverse=True)
    return {
        "ms_per_call": {label: us / 1e3 for label, us in sorted(per_class_us.items())},
        "kernels_per_call": dict(sorted(per_class_count.items())),
        "kernel_ms_per_call": sum(per_class_us.values()) / 1e3,
        "top_kernels": [
            {"ms_per_call": us / 1e3, "launches_per_call": count, "class": label, "name": name}
            for us, count, label, name in kernels[:20]
        ],
    }


def replay_timeline(run, device: torch.device, calls: int) -> dict | None:
    """The kernels of `calls` graph replays as the profiler saw them inside the graph, in launch order: per kernel of
    one call, its name, class, microseconds and the idle microseconds before it (None where the profiler sees no
    kernels inside a graph replay)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for _ in range(calls):
            run()
            synchronize(device)
    kernels = sorted(
        (event.time_range.start, event.time_range.end, event.name)
        for event in profiler.events()
        if event.device_type == torch.autograd.DeviceType.CUDA and event.time_range.end > event.time_range.start
    )
    if not kernels or len(kernels) % calls:
        return None
    per_call = len(kernels) // calls
    last = kernels[-per_call:]  # the last replay: warm
    timeline, previous_end = [], last[0][0]
    for start, end, name in last:
        timeline.append(
            {"name": name[:120], "class": kernel_class(name), "us": end - start, "idle_before_us": start - previous_end}
        )
        previous_end = end
    idle = sum(k["idle_before_us"] for k in timeline)
    per_class = defaultdict(float)
    for k in timeline:
        per_class[k["class"]] += k["us"]
    return {
        "kernels": len(timeline),
        "span_us": last[-1][1] - last[0][0],
        "idle_us": idle,
        "us_per_class": dict(per_class),
        "timeline": timeline,
    }


@torch.no_grad()  # as the loop runs its steps (a compiled step called with gradients on would compile again)
def measure_variant(target, draft, prompt, args, variant: str, draft_tokens: int | None) -> dict:
    device = target.device
    use_graphs = device.type == "cuda"
    needed = prompt.shape[1] + args.max_new_tokens + 2 * (draft.config.num_draft_tokens + 1)
    started = time.perf_counter()
    compiled, skinny = variant.startswith("compiled"), "skinny" in variant
    runner = static_loop.runner_for(
        target, draft, 1, needed, LogitsProcessorList(), False, use_graphs, ("greedy",), draft_tokens, compiled,
        skinny,
    )  # fmt: skip
    prepare_seconds = time.perf_counter() - started
    b = runner.buffers
    runner.prefill(prompt, torch.ones_like(prompt))
    b.kept.fill_(1)
    timings = cost_model.summarize(
        cost_model.time_calls(runner.verify_step, cost_model.no_reset, device, 3, args.repeats)
    )
    entry = {"queries": runner.queries, "prepare_seconds": prepare_seconds, "verify_ms": timings}
    roofline = cost_model.forward_roofline(target, runner.max_len, device)
    if roofline is not None:
        entry["roofline_ms"] = roofline["roofline_ms"]
        entry["verify_vs_roofline"] = timings["median_ms"] / roofline["roofline_ms"]
        entry["bandwidth_gb_per_s"] = roofline["bandwidth_gb_per_s"]
    # The kernels of the step itself, launched one by one outside the graph (the same kernels it replays): their sum
    # against the replay's time estimates the idle GPU between kernels; `replay` below measures it inside the graph.
    breakdown = kernel_breakdown(runner.verify_step.step, device, args.profiled_calls)
    breakdown["idle_ms_per_call"] = max(timings["median_ms"] - breakdown["kernel_ms_per_call"], 0.0)
    entry["kernels"] = breakdown
    if use_graphs:
        entry["replay"] = replay_timeline(runner.verify_step, device, 3)
    print(
        f"  Q={runner.queries} {variant}: {timings['median_ms']:.3f} ms"
        + (f" ({entry['verify_vs_roofline']:.2f}x roofline)" if "verify_vs_roofline" in entry else "")
        + (
            f", replay: {entry['replay']['kernels']} kernels, idle {entry['replay']['idle_us']:.0f} us, "
            f"{ {k: round(v) for k, v in entry['replay']['us_per_class'].items()} }"
            if entry.get("replay")
            else ""
        )
        + f", kernels {breakdown['kernel_ms_per_call']:.3f} ms in "
        + f"{sum(breakdown['kernels_per_call'].values())} launches: "
        + ", ".join(f"{k} {v:.3f}" for k, v in breakdown["ms_per_call"].items()),
        flush=True,
    )
    return entry


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    options = inductor_options(args.inductor)
    import torch._inductor.config as inductor

    for name, value in options.items():
        setattr(inductor, name, value)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    preset = cost_model.PRESETS[args.preset]
    target = cost_model.build_target(preset.target, device, getattr(torch, preset.dtype), preset.architecture)
    draft = cost_model.build_draft(target, 1, args.block_size, preset.markov_rank)
    prompt = torch.randint(0, preset.target["vocab_size"], (1, args.prompt_length), device=device)
    report = {
        "provenance": run_provenance(args.device),
        "settings": {**{k: v for k, v in vars(args).items() if k != "out"}, "inductor_options": options},
        "variants": {},
    }
    for variant in args.variants:
        steps = {"verify": (None, f"verify_{args.block_size + 1}"), "decode": (0, "decode_1")}
        for draft_tokens, label in (steps[step] for step in args.steps):
            name = f"{variant}/{label}"
            try:
                report["variants"][name] = measure_variant(target, draft, prompt, args, variant, draft_tokens)
            except Exception as error:  # one variant failing is a result; the others still run
                report["variants"][name] = {"error": f"{type(error).__name__}: {str(error)[:800]}"}
                print(f"  {name} failed: {error}", flush=True)
            (out / "verify_profile.json").write_text(json.dumps(report, indent=1))
        static_loop._RUNNERS.clear()
    return report


if __name__ == "__main__":
    main()
