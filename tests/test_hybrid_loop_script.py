"""Smoke test of benchmarks/hybrid_loop.py on a tiny random Qwen3.5 (CPU): every method ran at every batch size, each
loop's round is split into its phases (a rollback in the dynamic loop, none on the static path), and the report says
which GDN kernels were there."""

from __future__ import annotations

import json

import pytest
from module_files import load_benchmark


def test_tiny_run_reports_each_loops_phases_per_batch(tmp_path):
    module = load_benchmark("hybrid_loop")
    module.main(
        ["--preset", "tiny-hybrid", "--device", "cpu", "--batch-sizes", "1", "3", "--prompt-length", "12",
         "--max-new-tokens", "6", "--block-size", "4", "--repeats", "2", "--methods", "plain", "loop", "loop_static",
         "--out", str(tmp_path)]
    )  # fmt: skip
    report = json.loads((tmp_path / "hybrid_loop.json").read_text())
    assert set(report["fast_gdn_kernels"]) == {"fla", "causal_conv1d"}
    assert [entry["batch"] for entry in report["batches"]] == [1, 3]
    for entry in report["batches"]:
        assert "error" not in entry, entry
        assert all(len(entry["samples_seconds"][name]) == 2 for name in ("plain", "loop", "loop_static"))
        assert set(entry["speedup_vs_plain"]) == {"loop", "loop_static"}
        for name in ("loop", "loop_static"):
            assert set(entry[name]["ms_per_round"]) == {"draft", "verify", "rollback", "commit"}
            assert entry[name]["mean_acceptance_length"] >= 1
        assert entry["loop"]["ms_per_round"]["rollback"] > 0 and 0 < entry["loop"]["rollback_share_of_round"] < 1
        assert entry["loop_static"]["ms_per_round"]["rollback"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["compiled", "skinny"])
def test_compiled_methods_predict_speculations_gain_over_plain_decoding_on_the_same_path(tmp_path, kind):
    """The compiled pair and, the same with the kernels (Triton's interpreter here), the skinny pair."""
    module = load_benchmark("hybrid_loop")
    loop, decode = f"loop_static_{kind}", f"decode_static_{kind}"
    module.main(
        ["--preset", "tiny-hybrid", "--device", "cpu", "--batch-sizes", "2", "--prompt-length", "12",
         "--max-new-tokens", "6", "--block-size", "4", "--repeats", "1", "--methods", "plain", loop, decode,
         "--out", str(tmp_path)]
    )  # fmt: skip
    (entry,) = json.loads((tmp_path / "hybrid_loop.json").read_text())["batches"]
    assert "error" not in entry, entry
    assert set(entry["speedup_vs_plain"]) == {loop, decode}
    round_ms = entry[loop]["ms_per_round_wall"]
    predicted = entry[f"predicted_speedup_over_decode_static_{kind}"]
    decode_ms = entry["ms_per_token_step"][decode]
    assert predicted["3.0"] == pytest.approx(3 * decode_ms / round_ms)
