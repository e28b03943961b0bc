"""Weight-streaming speed of dspark.skinny_linear's kernels against cuBLAS, for every product a target's verify step
routes through them (issue #3: the verify step within 1.5x of its roofline).

    python3 benchmarks/skinny_linear.py --out $OUT                                 # Qwen3-8B shape, on a GPU
    python3 benchmarks/skinny_linear.py --preset qwen3.5-9b --out $OUT
    python3 benchmarks/skinny_linear.py --preset tiny --device cpu --out /tmp/sl   # smoke run (Triton interpreter)

Products: the target of benchmarks/cost_model.py's preset is built on the meta device (no weights) and
`routed_modules` lists what the kernels run: gated MLPs (gate and up in one launch, SiLU in the epilogue), projection
groups (q, k and v; a Gated DeltaNet layer's four input projections: one launch each), then every other linear layer
(o and down projections, the output head); equal shapes are timed once.
Per product and row count (--rows):
  cublas    F.linear per weight: the GEMMs alone (no activation kernels for a gated pair, no concatenation for a
            group; the runs in docs/results/skinny_linear_h200_2026-12-02 timed those too)
  planned   the kernel with `plan_launch`'s tiles and splits: what the loop runs
  best      (rows in --sweep-rows) the fastest of a sweep: tiles x splits first, then stages x warps for the best
Timing: a CUDA graph runs the product once over each of as many weight copies as fill 4x the L2 cache (so no
weight is served from cache), replayed --repeats times; median microseconds per product and GB/s of weight bytes,
beside the measured device-to-device copy bandwidth. Check: each kernel's output against cuBLAS's.

--chain (attention-only presets): one decoder layer's projections as a dependency chain, q/k/v -> o -> gate-up ->
down -> the next layer's q/k/v, over enough layer copies to exceed 4x L2: cuBLAS (with its SiLU and product
kernels), our kernels, and our kernels launched with programmatic dependent launch (each kernel may be launched while
the previous one still runs, and waits for its writes before reading its input): what launch overlap would save.

--prefetch (attention-only presets): the same chain with idle gaps where the verify step runs its other kernels
(--gaps-us after q/k/v, after o, after down; one-thread spin kernels), without and with the next projection's
weights prefetched into L2 on a side stream during each gap (benchmarks/l2_prefetch.py; budgets --budgets-mib),
joined before the consumer or at the end: what filling the memory bus's idle time would save. --rows with no value
skips the per-product timings.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import cost_model  # noqa: E402

from dspark import skinny_linear  # noqa: E402
from dspark.provenance import run_provenance  # noqa: E402

TILES = list(itertools.product((32, 64, 128), (64, 128, 256)))  # (block_out, block_in)
PIPELINES = list(itertools.product((3, 4, 5, 6), (4, 8)))  # (stages, warps)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for skinny_linear.json")
    parser.add_argument("--preset", default="qwen3-8b", choices=sorted(cost_model.PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, nargs="*", default=[1, 9, 16, 36, 64])
    parser.add_argument("--sweep-rows", type=int, nargs="*", default=[9])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=400, help="stop sweeping after this long (results so far)")
    parser.add_argument("--chain", action="store_true", help="also time a layer's launches as a dependency chain")
    parser.add_argument(
        "--prefetch", action="store_true", help="also time the chain with idle gaps, with and without L2 prefetches"
    )
    parser.add_argument(
        "--gaps-us", type=float, nargs=3, default=[20.0, 4.0, 7.0], metavar=("ATTENTION", "NORM", "END")
    )
    parser.add_argument("--budgets-mib", type=float, nargs="+", default=[8, 16, 32])
    return parser.parse_args(argv)


def products(preset_name: str) -> list[dict]:
    """The distinct (out, in, gated) products of the preset's target, with the modules that have each shape."""
    preset = cost_model.PRESETS[preset_name]
    target = cost_model.build_target(preset.target, torch.device("meta"), torch.bfloat16, preset.architecture)
    names = {module: name for name, module in target.named_modules()}
    mlps, groups, linears = skinny_linear.routed_modules(target)
    found: dict[tuple, list[str]] = {}
    launches = [([m.gate_proj, m.up_proj], True, m) for m in mlps]
    launches += [(members, False, members[0]) for members in groups] + [([m], False, m) for m in linears]
    for members, gated, module in launches:
        widths = tuple(member.out_features for member in members)
        found.setdefault((widths, members[0].in_features, gated), []).append(names[module])
    return [
        {"widths": list(widths), "in_features": k, "gated": gated, "count": len(modules), "example": modules[0]}
        for (widths, k, gated), modules in found.items()
    ]


class Product:
    """Weight copies of one product on the device, an input of `rows` rows, and timed runs over all copies."""

    def __init__(self, spec: dict, rows: int, device: torch.device, dtype: torch.dtype):
        self.spec, self.rows, self.device = spec, rows, device
        k = spec["in_features"]
        self.weight_bytes = sum(spec["widths"]) * k * torch.finfo(dtype).bits // 8
        l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
        copies = max(2, math.ceil(4 * l2 / self.weight_bytes)) if device.type == "cuda" else 1
        generator = torch.Generator(device).manual_seed(rows)
        self.weights = [
            [torch.randn(n, k, device=device, generator=generator).mul_(k**-0.5).to(dtype) for n in spec["widths"]]
            for _ in range(copies)
        ]
        self.x = torch.randn(rows, k, device=device, generator=generator).to(dtype)

    def cublas(self, weights: list[torch.Tensor]) -> list[torch.Tensor]:
        """What cuBLAS must do in any case: one GEMM per weight (the timed baseline)."""
        return [torch.nn.functional.linear(self.x, w) for w in weights]

    def reference(self) -> torch.Tensor:
        """What the kernel computes, from cuBLAS's GEMMs: SiLU(gate) * up, or the group's outputs side by side."""
        outs = self.cublas(self.weights[0])
        return torch.nn.functional.silu(outs[0]) * outs[1] if self.spec["gated"] else torch.cat(outs, dim=-1)

    def kernel(self, weights: list[torch.Tensor], plan: skinny_linear.LaunchPlan | None) -> torch.Tensor:
        return skinny_linear.launch(self.x, weights, None, self.spec["gated"], plan)

    def microseconds(self, run, repeats: int) -> float:
        """Median microseconds per product: one pass over every weight copy."""

        def one_pass():
            for weights in self.weights:
                run(weights)

        return cost_model.graph_microseconds(one_pass, self.device, repeats, len(self.weights))

    def entry(self, run, repeats: int, reference: torch.Tensor | None = None) -> dict:
        us = self.microseconds(run, repeats)
        result = {"us": us, "gb_per_s": self.weight_bytes / (us * 1e-6) / 1e9}
        if reference is not None:
            out = run(self.weights[0]).float()
            result["max_abs_difference_vs_cublas"] = float((out - reference).abs().max() / reference.abs().max())
        return result


def sweep(product: Product, processors: int, repeats: int) -> list[dict]:
    """Tiles x splits at 4 stages and 4 warps, then stages x warps for the best tiles and split."""
    rows, k, widths = product.rows, product.spec["in_features"], product.spec["widths"]
    block_rows = max(16, 1 << (rows - 1).bit_length())
    tried = []

    def attempt(plan: skinny_linear.LaunchPlan) -> None:
        try:
            result = product.entry(lambda weights: product.kernel(weights, plan), repeats)
        except Exception as error:  # too much shared memory for a tile, say: a result, not a crash
            result = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
        tried.append({"plan": plan.__dict__, **result})

    for block_out, block_in in TILES:
        steps = math.ceil(k / block_in)
        tiles = sum(math.ceil(width / block_out) for width in (widths[:1] if product.spec["gated"] else widths))
        splits = 1
        while splits == 1 or (splits <= 32 and steps // splits >= 2):
            if splits == 1 or tiles * splits <= 16 * processors:
                attempt(skinny_linear.LaunchPlan(block_rows, block_out, block_in, splits))
            splits *= 2
    timed = [entry for entry in tried if "us" in entry]
    if timed:
        best = min(timed, key=lambda entry: entry["us"])["plan"]
        for stages, warps in PIPELINES:
            if (stages, warps) != (best["stages"], best["warps"]):
                attempt(skinny_linear.LaunchPlan(**{**best, "stages": stages, "warps": warps}))
    return tried


def layer_chain(preset_name: str, rows: int, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    """Microseconds per layer of the chain q/k/v -> o -> gate-up -> down for cuBLAS, the kernels, and the kernels
    with programmatic dependent launch; and whether the last two computed the same output."""
    layers, query = layer_weights(preset_name, device, dtype, 2)
    hidden = layers[0]["qkv"][0].shape[1]
    x = torch.randn(rows, hidden, device=device, generator=torch.Generator(device).manual_seed(1)).to(dtype)
    linear = torch.nn.functional.linear

    def cublas() -> torch.Tensor:
        h = x
        for layer in layers:
            q, _, _ = (linear(h, w) for w in layer["qkv"])
            o = linear(q, layer["o"][0])
            gated = torch.nn.functional.silu(linear(o, layer["gate_up"][0])) * linear(o, layer["gate_up"][1])
            h = linear(gated, layer["down"][0])
        return h

    def kernels(pdl: bool) -> torch.Tensor:
        h = x
        for layer in layers:
            qkv = skinny_linear.launch(h, layer["qkv"], pdl=pdl)
            o = skinny_linear.launch(qkv[:, :query], layer["o"], pdl=pdl)  # q's columns: a row-strided view
            gated = skinny_linear.launch(o, layer["gate_up"], gated=True, pdl=pdl)
            h = skinny_linear.launch(gated, layer["down"], pdl=pdl)
        return h

    variants = {"cublas": cublas, "kernels": lambda: kernels(False), "kernels_pdl": lambda: kernels(True)}
    result = {"layers": len(layers), "rows": rows, "us_per_layer": {}, "errors": {}}
    outputs = {}
    for name, run in variants.items():
        try:
            outputs[name] = run()
            result["us_per_layer"][name] = cost_model.graph_microseconds(run, device, repeats, len(layers))
        except Exception as error:  # PDL missing from this Triton or GPU (or the interpreter), say: a result
            result["errors"][name] = f"{type(error).__name__}: {str(error)[:400]}"
    if {"cublas", "kernels"} <= set(outputs):
        reference = outputs["cublas"].float()
        difference = (outputs["kernels"].float() - reference).abs().max() / reference.abs().max()
        result["kernels_max_relative_difference_vs_cublas"] = float(difference)
    if {"kernels", "kernels_pdl"} <= set(outputs):
        result["pdl_output_equals_kernels"] = bool(torch.equal(outputs["kernels"], outputs["kernels_pdl"]))
    return result


def layer_weights(preset_name: str, device: torch.device, dtype: torch.dtype, least: int) -> tuple[list[dict], int]:
    """Random weights of one decoder layer's projections (q/k/v, o, gate-up, down) for as many layers as exceed 4x
    the L2 cache (at least `least`), and the width of q."""
    shape = cost_model.PRESETS[preset_name].target
    hidden, inner = shape["hidden_size"], shape["intermediate_size"]
    head_dim = shape.get("head_dim") or hidden // shape["num_attention_heads"]
    query, key = shape["num_attention_heads"] * head_dim, shape["num_key_value_heads"] * head_dim
    sizes = {"qkv": [(query, hidden), (key, hidden), (key, hidden)], "o": [(hidden, query)]}
    sizes |= {"gate_up": [(inner, hidden), (inner, hidden)], "down": [(hidden, inner)]}
    layer_bytes = sum(n * k for group in sizes.values() for n, k in group) * torch.finfo(dtype).bits // 8
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    generator = torch.Generator(device).manual_seed(0)
    count = max(least, math.ceil(4 * l2 / layer_bytes))
    layers = [
        {
            name: [torch.randn(n, k, device=device, generator=generator).mul_(k**-0.5).to(dtype) for n, k in group]
            for name, group in sizes.items()
        }
        for _ in range(count)
    ]
    return layers, query


def sleep_cycles_per_microsecond(device: torch.device) -> float:
    """torch.cuda._sleep's spin cycles per microsecond of this GPU, timed."""
    cycles = 2_000_000
    torch.cuda._sleep(1000)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / (1e3 * start.elapsed_time(end))


def prefetch_chain(
    preset_name: str, rows: int, device: torch.device, dtype: torch.dtype, repeats: int, gaps_us, budgets_mib
) -> dict:
    """The layer chain with idle gaps where the verify step runs its other kernels (after q/k/v: attention; after o:
    a norm; after down: the residual and the next norm; a one-thread spin kernel each), microseconds per layer:
    without prefetches, and with the next projection's weights prefetched into L2 on a side stream during each gap
    (o whole; gate-up and the next layer's q/k/v up to a budget), joined before the consumer or at the end."""
    import l2_prefetch

    layers, query = layer_weights(preset_name, device, dtype, 4)
    x = torch.randn(rows, layers[0]["qkv"][0].shape[1], device=device, dtype=dtype)
    per_us = sleep_cycles_per_microsecond(device)
    gaps = [int(gap * per_us) for gap in gaps_us]
    launch = skinny_linear.launch
    prefetcher = l2_prefetch.SideStreamPrefetcher(device)

    def chain(with_gaps: bool, budget: int | None, join_at_consumer: bool) -> torch.Tensor:
        def gap(index: int) -> None:
            if with_gaps and gaps[index] > 0:
                torch.cuda._sleep(gaps[index])

        def fetch(weights: list[torch.Tensor], limit: int | None) -> None:
            if budget is not None:
                prefetcher.prefetch(weights, limit)

        def ready() -> None:
            if join_at_consumer:
                prefetcher.join()

        h = x
        for index, layer in enumerate(layers):
            ready()
            qkv = launch(h, layer["qkv"])
            fetch(layer["o"], None)
            gap(0)
            ready()
            o = launch(qkv[:, :query].contiguous(), layer["o"])
            fetch(layer["gate_up"], budget)
            gap(1)
            ready()
            gated = launch(o, layer["gate_up"], gated=True)
            h = launch(gated, layer["down"])
            fetch(layers[(index + 1) % len(layers)]["qkv"], budget)
            gap(2)
        prefetcher.join()
        return h

    variants = {"kernels": (False, None, False), "kernels_gaps": (True, None, False)}
    for mib in budgets_mib:
        for join in ("consumer", "end"):
            variants[f"prefetch_{mib:g}mib_join_{join}"] = (True, int(mib * 2**20), join == "consumer")
    result = {"layers": len(layers), "rows": rows, "gaps_us": list(gaps_us), "sleep_cycles_per_us": per_us}
    result |= {"us_per_layer": {}, "errors": {}}
    reference = chain(False, None, False)
    for name, (with_gaps, budget, join) in variants.items():
        try:
            run = functools.partial(chain, with_gaps, budget, join)
            result["us_per_layer"][name] = cost_model.graph_microseconds(run, device, repeats, len(layers))
            if not torch.equal(run(), reference):
                result["errors"][name] = "output differs from the kernels' without prefetches"
        except Exception as error:
            result["errors"][name] = f"{type(error).__name__}: {str(error)[:400]}"
        print(f"  {name}: {result['us_per_layer'].get(name)} us per layer", flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    dtype = cost_model.kernel_dtype(device)
    processors, shared_memory = skinny_linear.device_limits(device)
    started = time.perf_counter()
    report = {
        "provenance": run_provenance(args.device),
        "preset": args.preset,
        "dtype": str(dtype),
        "processors": processors,
        "shared_memory_bytes": shared_memory,
        "copy_bandwidth": cost_model.copy_bandwidth(device, 2048 if device.type == "cuda" else 16, 3, 10),
        "products": [],
    }
    for spec in products(args.preset):
        entry = {**spec, "rows": {}}
        report["products"].append(entry)
        for rows in args.rows:
            try:
                product = Product(spec, rows, device, dtype)
                cublas = product.entry(product.cublas, args.repeats)
                reference = product.reference().float()
                plan = skinny_linear.plan_launch(
                    rows, tuple(spec["widths"]), spec["in_features"], spec["gated"], processors, shared_memory
                )
                planned = product.entry(lambda w, p=product: p.kernel(w, None), args.repeats, reference)
                result = {"cublas": cublas, "planned": {"plan": plan.__dict__, **planned}}
                result["planned_speedup"] = cublas["us"] / planned["us"]
                if rows in args.sweep_rows and time.perf_counter() - started < args.seconds:
                    tried = sweep(product, processors, args.repeats)
                    timed = sorted((t for t in tried if "us" in t), key=lambda t: t["us"])
                    result["best"] = timed[0] if timed else None
                    result["sweep"] = tried
                entry["rows"][rows] = result
                best = result.get("best")
                best_text = f" | best {best['us']:8.1f} us {best['plan']}" if best else ""
                shape = f"{'+'.join(map(str, spec['widths']))}x{spec['in_features']}"
                print(
                    f"{spec['example']:>40} {shape:>22} rows {rows:>2}: "
                    f"cublas {cublas['us']:8.1f} us {cublas['gb_per_s']:6.0f} GB/s | planned {planned['us']:8.1f} us "
                    f"{planned['gb_per_s']:6.0f} GB/s{best_text}",
                    flush=True,
                )
                del product
            except Exception as error:
                traceback.print_exc()
                entry["rows"][rows] = {"error": f"{type(error).__name__}: {str(error)[:600]}"}
            report["wall_seconds"] = time.perf_counter() - started
            (out / "skinny_linear.json").write_text(json.dumps(report, indent=1))
    if args.chain:
        report["chain"] = layer_chain(args.preset, 9, device, dtype, args.repeats)
        print("chain (us per layer):", json.dumps(report["chain"]), flush=True)
        (out / "skinny_linear.json").write_text(json.dumps(report, indent=1))
    if args.prefetch:
        report["prefetch"] = prefetch_chain(args.preset, 9, device, dtype, args.repeats, args.gaps_us, args.budgets_mib)
        (out / "skinny_linear.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
