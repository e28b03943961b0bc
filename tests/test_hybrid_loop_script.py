"""Smoke test of benchmarks/hybrid_loop.py on a tiny random Qwen3.5 (CPU): both methods ran at every batch size, our
loop's round is split into its phases with a non-zero rollback, and the report says which GDN kernels were there."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "hybrid_loop.py"


def test_tiny_run_reports_the_rollback_share_per_batch(tmp_path):
    spec = importlib.util.spec_from_file_location("hybrid_loop", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    module.main(
        ["--preset", "tiny", "--device", "cpu", "--batch-sizes", "1", "3", "--prompt-length", "12",
         "--max-new-tokens", "6", "--block-size", "4", "--repeats", "2", "--out", str(tmp_path)]
    )  # fmt: skip
    report = json.loads((tmp_path / "hybrid_loop.json").read_text())
    assert set(report["fast_gdn_kernels"]) == {"fla", "causal_conv1d"}
    assert [entry["batch"] for entry in report["batches"]] == [1, 3]
    for entry in report["batches"]:
        assert "error" not in entry, entry
        assert len(entry["samples_seconds"]["plain"]) == len(entry["samples_seconds"]["loop"]) == 2
        assert set(entry["loop_ms_per_round"]) == {"draft", "verify", "rollback", "commit"}
        assert entry["loop_ms_per_round"]["rollback"] > 0 and 0 < entry["rollback_share_of_round"] < 1
        assert entry["mean_acceptance_length"] >= 1
