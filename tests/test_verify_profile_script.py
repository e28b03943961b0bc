"""Smoke test of benchmarks/verify_profile.py on the tiny random target (CPU): the report has every variant's timing
and kernel breakdown, inductor options are checked by name, and kernel names fall into the right classes."""

from __future__ import annotations

import json

import pytest
from module_files import load_benchmark


@pytest.fixture(scope="module")
def verify_profile():
    return load_benchmark("verify_profile")


def test_tiny_run_reports_both_verify_shapes(verify_profile, tmp_path):
    verify_profile.main(
        ["--preset", "tiny", "--device", "cpu", "--variants", "graph", "--repeats", "2", "--profiled-calls", "1",
         "--prompt-length", "8", "--max-new-tokens", "8", "--block-size", "4", "--out", str(tmp_path)]
    )  # fmt: skip
    report = json.loads((tmp_path / "verify_profile.json").read_text())
    assert set(report["variants"]) == {"graph/verify_5", "graph/decode_1"}
    for entry in report["variants"].values():
        assert "error" not in entry, entry
        assert entry["verify_ms"]["median_ms"] > 0 and entry["verify_ms"]["repeats"] == 2
        assert {"ms_per_call", "kernels_per_call", "kernel_ms_per_call", "top_kernels"} <= set(entry["kernels"])
    assert report["variants"]["graph/verify_5"]["queries"] == 5 and report["variants"]["graph/decode_1"]["queries"] == 1


def test_inductor_options_are_checked_by_name(verify_profile):
    assert verify_profile.inductor_options(["max_autotune_gemm=True", "coordinate_descent_tuning=False"]) == {
        "max_autotune_gemm": True,
        "coordinate_descent_tuning": False,
    }
    with pytest.raises(SystemExit, match="no option 'max_autotune_gem'"):
        verify_profile.inductor_options(["max_autotune_gem=True"])


def test_kernel_names_fall_into_classes(verify_profile):
    classes = {
        "nvjet_sm90_tst_128x16_64x11_4x1_v_bz_TNT": "gemm",
        "void cublasLt::splitKreduce_kernel<32, 16, int, float>": "gemm",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16": "attention",
        "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0": "fused_triton",
        "void at::native::_scatter_gather_elementwise_kernel<128, 8>": "copy_index",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, MeanOps>>": "other",
    }
    assert {name: verify_profile.kernel_class(name) for name in classes} == classes
