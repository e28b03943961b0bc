"""The verify block's attention: dspark.verify_attention's kernel against torch's SDPA kernels, on a GPU.

    python3 benchmarks/verify_attention.py --out $OUT/va                        # Qwen3-8B and Qwen3.5-9B heads
    python3 benchmarks/verify_attention.py --device cpu --out /tmp/va --presets tiny --lengths 96 --batches 1

Per preset's attention shape (heads, key/value heads, head size), batch, queries per sequence and cache length:
microseconds per call of SDPA as torch picks it (cuDNN on Hopper), SDPA restricted to the memory-efficient kernel (what
the loop's verify step runs without the kernels), and the kernel; inputs as the static loop's verify step passes them
(keys and values [B, Hkv, L, D] of the whole static cache, a bool mask [B, 1, Q, L] of a prefix plus the causal block,
half the cache filled). Timing: a CUDA graph of --calls calls, replayed --repeats times, median per call (every call
reads the same ~MB of keys and values: served from L2, as in the verify step where they were just written). Check:
the kernel's output against SDPA's in float32 (max absolute difference).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import cost_model  # noqa: E402

from dspark import verify_attention  # noqa: E402
from dspark.provenance import run_provenance  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for verify_attention.json")
    parser.add_argument("--presets", nargs="+", default=["qwen3-8b", "qwen3.5-9b"], choices=sorted(cost_model.PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 9, 17])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--sweep", action="store_true", help="also time the kernel over key-block sizes x stages x key parts per shape"
    )
    return parser.parse_args(argv)


def calls_microseconds(run, device: torch.device, calls: int, repeats: int) -> float:
    """Median microseconds per call of `run`, from a CUDA graph of `calls` calls (a CPU: one call, timed)."""
    return cost_model.graph_microseconds(lambda: [run() for _ in range(calls)], device, repeats, calls)


def inputs(shape: dict, batch: int, queries: int, length: int, device, dtype):
    heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = shape.get("head_dim") or shape["hidden_size"] // heads
    generator = torch.Generator(device).manual_seed(length + queries)
    query = torch.randn(batch, heads, queries, head_dim, device=device, generator=generator).to(dtype)
    key, value = (
        torch.randn(batch, kv_heads, length, head_dim, device=device, generator=generator).to(dtype) for _ in range(2)
    )
    filled = length // 2
    positions = torch.arange(length, device=device)
    mask = positions[None, :] <= filled + torch.arange(queries, device=device)[:, None]
    return query, key, value, mask[None, None].expand(batch, 1, queries, length).contiguous()


def sdpa(query, key, value, mask, backends=None):
    group = query.shape[1] // key.shape[1]
    if backends is None:
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=group > 1)
    with sdpa_kernel(backends):
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=group > 1)


def measure(shape: dict, batch: int, queries: int, length: int, device, dtype, args) -> dict:
    """Microseconds per call of each attention, the kernel's plan and its difference from SDPA in float32."""
    query, key, value, mask = inputs(shape, batch, queries, length, device, dtype)
    scaling = query.shape[-1] ** -0.5
    runs = {
        "sdpa_default": lambda: sdpa(query, key, value, mask),
        "sdpa_efficient": lambda: sdpa(query, key, value, mask, [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]),
        "kernel": lambda: verify_attention.attention(query, key, value, mask, scaling),
    }
    entry = {}
    for name, run in runs.items():
        try:
            entry[f"{name}_us"] = calls_microseconds(run, device, args.calls, args.repeats)
        except Exception as error:  # a backend that refuses the shape: a result
            entry[f"{name}_error"] = f"{type(error).__name__}: {str(error)[:300]}"
    reference = sdpa(*(t.float() for t in (query, key, value)), mask, [SDPBackend.MATH]).transpose(1, 2)
    kernel = verify_attention.attention(query, key, value, mask, scaling).float()
    entry["kernel_max_abs_difference"] = float((kernel - reference).abs().max())
    processors = verify_attention.device_limits(device)[0]
    heads, kv_heads, head_dim = query.shape[1], key.shape[1], query.shape[-1]
    plan = verify_attention.plan_attention(batch, heads, kv_heads, queries, length, head_dim, processors)
    entry["plan"] = plan.__dict__
    if args.sweep:
        entry["sweep"] = sweep(plan, length, lambda p: verify_attention.attention(query, key, value, mask, scaling, p),
                               device, args)  # fmt: skip
        entry["best"] = min((t for t in entry["sweep"] if "us" in t), key=lambda t: t["us"], default=None)
    return entry


def sweep(plan, keys: int, run, device, args) -> list[dict]:
    """The kernel's time for key blocks of 32-128 keys, 1-3 pipeline stages and 1-8 key parts."""
    tried = []
    for block_n, stages, splits in itertools.product((32, 64, 128), (1, 2, 3), (1, 2, 4, 8)):
        if splits * block_n > keys:
            continue
        candidate = replace(verify_attention.split_keys(plan, keys, splits, block_n), stages=stages)
        try:
            us = calls_microseconds(functools.partial(run, candidate), device, args.calls, args.repeats)
            tried.append({"plan": candidate.__dict__, "us": us})
        except Exception as error:  # too much shared memory, say: a result
            tried.append({"plan": candidate.__dict__, "error": f"{type(error).__name__}: {str(error)[:200]}"})
    return tried


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    dtype = cost_model.kernel_dtype(device)
    report = {"provenance": run_provenance(args.device), "settings": {k: v for k, v in vars(args).items()}}
    report["settings"]["dtype"] = str(dtype)
    report["results"] = []
    for preset in args.presets:
        for batch in args.batches:
            for queries in args.queries:
                for length in args.lengths:
                    entry = {"preset": preset, "batch": batch, "queries": queries, "length": length}
                    entry |= measure(cost_model.PRESETS[preset].target, batch, queries, length, device, dtype, args)
                    report["results"].append(entry)
                    print(json.dumps(entry), flush=True)
                    (out / "verify_attention.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
