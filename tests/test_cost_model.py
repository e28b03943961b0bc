"""Smoke test of benchmarks/cost_model.py: the tiny preset on CPU writes a complete, self-consistent report.

Nothing here asserts a speed: CPU timings of a tiny model say nothing about the GPU cost model. The checks are about
structure, positivity, the static path computing what the eager path computes, and the arithmetic of the
predictions.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from module_files import load_benchmark


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("cost")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: thread start-up and a busy CPU cost more than they gain
    try:
        returned = load_benchmark("cost_model").main(["--preset", "tiny", "--device", "cpu", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    written = json.loads((out / "cost_model.json").read_text())
    assert written == json.loads(json.dumps(returned))
    return written


def test_report_sections_and_provenance(report):
    assert report["errors"] == {}
    for key in ("command", "date", "device", "packages", "git_commit"):
        assert key in report["provenance"]
    assert report["settings"]["preset"] == "tiny"
    assert report["settings"]["verify_lengths"] == [8, 9, 16]  # block 8: anchor + 8 drafted tokens
    assert report["bandwidth"]["gb_per_s"] > 0
    assert report["wall_seconds"] > 0
    weights = report["roofline"]["target_weight_bytes"]
    assert 0 < weights["read_per_forward"] < weights["total"]  # the input embedding is a lookup, not read whole


def test_graph_capture_is_skipped_on_cpu_with_a_reason(report):
    assert "CUDA" in report["graphs"]["skipped_reason"]
    assert report["graphs"]["methods_used"] == []
    for name, entry in report["steps"].items():
        assert entry.get("graph") is None, name


def test_every_step_is_timed_against_its_roofline(report):
    steps = report["steps"]
    expected = {"decode", "verify_8", "verify_9", "verify_16", "draft_1_layers", "draft_2_layers", "accept"}
    assert set(steps) == expected
    for name, entry in steps.items():
        modes = ("eager",) if name == "accept" else ("eager", "static")
        for mode in modes:
            timing = entry[mode]
            assert timing["repeats"] == report["settings"]["repeats"]
            assert 0 < timing["min_ms"] <= timing["q1_ms"] <= timing["median_ms"] <= timing["q3_ms"] <= timing["max_ms"]
            assert timing["iqr_ms"] == pytest.approx(timing["q3_ms"] - timing["q1_ms"])
            if entry["roofline_ms"]:
                assert timing["roofline_ratio"] == pytest.approx(timing["median_ms"] / entry["roofline_ms"])
    rooflines = [steps[name]["roofline_ms"] for name in ("decode", "verify_8", "verify_16")]
    assert 0 < rooflines[0] < rooflines[1] < rooflines[2]  # more tokens, more KV cache to read
    assert steps["draft_1_layers"]["roofline_ms"] < steps["draft_2_layers"]["roofline_ms"]


def test_static_path_computes_what_the_eager_path_computes(report):
    for name, entry in report["steps"].items():
        if name == "accept":
            continue
        checks = entry["checks"]
        assert checks["finite"], name
        assert checks["static_vs_eager"]["max_abs_diff"] < 1e-4, name
        assert checks["static_vs_eager"]["argmax_agreement"] == 1.0, name


def test_generate_baseline(report):
    generate = report["generate"]
    assert generate["new_tokens"] == report["settings"]["generate_tokens"]  # random weights never stop early
    assert generate["per_token_ms"] > 0
    assert math.isfinite(generate["marginal_per_token_ms"])
    assert set(report["ratios"]) == {"generate_token_over_eager_decode", "generate_token_over_static_decode"}


def test_predictions_follow_the_round_cost_formula(report):
    settings, steps = report["settings"], report["steps"]
    rows = report["predictions"]
    assert len(rows) == 2 * len(settings["draft_layers"]) * len(settings["taus"])  # eager and static, no graph
    for row in rows:
        mode = row["mode"]
        draft = steps[f"draft_{row['draft_layers']}_layers"][mode]["median_ms"]
        verify = steps["verify_9"][mode]["median_ms"]
        accept = steps["accept"]["eager"]["median_ms"]
        assert row["t_round_ms"] == pytest.approx(draft + verify + accept)
        decode = steps["decode"][mode]["median_ms"]
        assert row["speedup_vs_decode"] == pytest.approx(row["tau"] * decode / row["t_round_ms"])
        generate = report["generate"]["marginal_per_token_ms"]
        assert row["speedup_vs_generate"] == pytest.approx(row["tau"] * generate / row["t_round_ms"])
