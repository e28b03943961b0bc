"""Smoke test of benchmarks/verify_attention.py on the tiny preset (CPU, Triton's interpreter): it times SDPA both
ways and the kernel, checks the kernel against SDPA in float32, and sweeps plans where asked."""

from __future__ import annotations

import json

import pytest
from module_files import load_benchmark

pytest.importorskip("triton")


def test_tiny_run_times_sdpa_and_the_kernel_and_checks_the_kernel(tmp_path):
    module = load_benchmark("verify_attention")
    module.main(
        ["--presets", "tiny", "--device", "cpu", "--batches", "1", "--queries", "9", "--lengths", "96",
         "--calls", "1", "--repeats", "1", "--sweep", "--out", str(tmp_path)]
    )  # fmt: skip
    report = json.loads((tmp_path / "verify_attention.json").read_text())
    (entry,) = report["results"]
    assert entry["sdpa_default_us"] > 0 and entry["sdpa_efficient_us"] > 0 and entry["kernel_us"] > 0
    assert entry["kernel_max_abs_difference"] < 1e-2  # float16 in the interpreter
    assert entry["plan"]["splits"] >= 1
    tried = {(t["plan"]["block_n"], t["plan"]["stages"], t["plan"]["splits"]) for t in entry["sweep"]}
    assert (32, 1, 1) in tried and (64, 3, 1) in tried and (32, 2, 2) in tried
    assert all("us" in t for t in entry["sweep"]), "every candidate plan of this shape runs"
    assert entry["best"]["us"] == min(t["us"] for t in entry["sweep"])
