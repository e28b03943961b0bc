"""Smoke test of benchmarks/loop_graphs.py: the tiny random target on CPU runs every method and writes the report.

No speed is asserted (CPU timings of a tiny model say nothing about the GPU); the checks are that every method ran,
that all of them emitted plain greedy's tokens (float32), and that the report has what the GPU run must fill in.
"""

from __future__ import annotations

import json

import torch
from module_files import load_benchmark

# The compiled variants are left out here: torch.compile of their steps is checked in test_static_loop.py, and
# compiling again would add a minute for nothing this smoke test can see.
METHODS = ["hf_generate", "loop_dynamic", "loop_static_eager", "loop_static", "decode_graph"]


def test_tiny_run_writes_a_complete_report(tmp_path):
    module = load_benchmark("loop_graphs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module.main(
            ["--targets", "tiny", "--device", "cpu", "--out", str(tmp_path), "--prompts", "2", "--repeats", "1",
             "--random-max-new-tokens", "6", "--random-prompt-length", "8", "--phase-repeats", "2",
             "--methods", *METHODS]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "loop_graphs.json").read_text())
    assert report["provenance"]["device"].startswith("CPU") and "torch" in report["provenance"]["packages"]
    tiny = report["targets"]["tiny"]
    assert tiny["errors"] == {}
    assert set(tiny["methods"]) == set(METHODS)
    assert all(len(entry["samples"]) == 2 for entry in tiny["methods"].values())
    assert all(all(values) for values in tiny["checks"].values()), tiny["checks"]
    assert "graph_equals_eager_static" in tiny["checks"]
    assert tiny["methods"]["loop_static"]["speedup_vs_hf_generate"]["median"] > 0
    phases = tiny["loop_static_phases"]
    assert set(phases["phases_ms"]) == {"draft", "verify", "accept"}
    assert phases["round"]["rounds"] >= 1 and phases["graphs_captured"]["draft"] is False  # no CUDA here
    assert set(tiny["decode_graph_phases"]["phases_ms"]) == {"verify", "accept"}
