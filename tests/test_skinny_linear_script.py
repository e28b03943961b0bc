"""Smoke test of benchmarks/skinny_linear.py on the tiny hybrid preset (CPU, Triton's interpreter): it lists every
launch the verify step makes (gated MLPs, projection groups, single projections, the head), times cuBLAS and the
planned kernel on each, checks the kernel's output against cuBLAS's, and sweeps plans where asked."""

from __future__ import annotations

import json

import pytest
from module_files import load_benchmark

pytest.importorskip("triton")


def test_tiny_run_times_every_launch_the_verify_step_makes(tmp_path):
    module = load_benchmark("skinny_linear")
    module.main(
        ["--preset", "tiny-hybrid", "--device", "cpu", "--rows", "9", "--sweep-rows", "--repeats", "1",
         "--out", str(tmp_path)]
    )  # fmt: skip
    report = json.loads((tmp_path / "skinny_linear.json").read_text())
    products = {(tuple(p["widths"]), p["gated"]): p for p in report["products"]}
    kinds = {(len(widths), gated) for widths, gated in products}
    assert {(2, True), (3, False), (4, False), (1, False)} <= kinds, "gate-up, q/k/v, Gated DeltaNet inputs, singles"
    vocab = module.cost_model.PRESETS["tiny-hybrid"].target["vocab_size"]
    assert products[((vocab,), False)]["example"] == "lm_head"
    for product in report["products"]:
        result = product["rows"]["9"]
        assert "error" not in result, result
        assert result["cublas"]["us"] > 0 and result["planned"]["us"] > 0
        assert result["planned"]["max_abs_difference_vs_cublas"] < 1e-2  # float16 in the interpreter


def test_the_sweep_times_every_tile_and_split_and_records_what_does_not_run(tmp_path):
    module = load_benchmark("skinny_linear")
    spec = {"widths": [48], "in_features": 256, "gated": False}
    product = module.Product(spec, 9, module.torch.device("cpu"), module.torch.float16)
    tried = module.sweep(product, processors=8, repeats=1)
    splits = {entry["plan"]["splits"] for entry in tried}
    assert {1, 2} <= splits
    assert all("us" in entry or "error" in entry for entry in tried)
    assert len({(e["plan"]["stages"], e["plan"]["warps"]) for e in tried}) == len(module.PIPELINES)


def test_the_layer_chain_runs_cublas_and_the_kernels_on_the_same_input(tmp_path):
    """--chain: q/k/v -> o -> gate-up -> down over two layers; the interpreter cannot run programmatic dependent
    launch, which the report records as an error of that variant alone."""
    module = load_benchmark("skinny_linear")
    module.main(
        ["--preset", "tiny", "--device", "cpu", "--rows", "1", "--sweep-rows", "--repeats", "1", "--chain",
         "--out", str(tmp_path)]
    )  # fmt: skip
    chain = json.loads((tmp_path / "skinny_linear.json").read_text())["chain"]
    assert set(chain["us_per_layer"]) == {"cublas", "kernels"}
    assert set(chain["errors"]) == {"kernels_pdl"}
    assert chain["kernels_max_relative_difference_vs_cublas"] < 1e-2
