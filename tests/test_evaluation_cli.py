"""`dspark eval` and `dspark bench` end to end on a tiny random target (with a word-level tokenizer built offline)
and a tiny draft, both saved to disk and loaded by path like real checkpoints."""

from __future__ import annotations

import json

import pytest
from tiny_models import save_chat_target, tiny_draft, tiny_llama

from dspark.cli import main


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    target, _ = save_chat_target(root / "target")
    tiny_draft(target, block_size=4, markov_rank=4, enable_confidence_head=True).save_pretrained(root / "draft")
    return root


def test_dspark_eval_scores_arms_per_domain_compares_them_and_caches_the_answers(checkpoints, tmp_path):
    out, cache = tmp_path / "eval", tmp_path / "cache"
    arguments = [
        "eval",
        "--target",
        str(checkpoints / "target"),
        "--draft",
        f"a={checkpoints / 'draft'}",
        "--draft",
        f"b={checkpoints / 'draft'}",
        "--prompts",
        "mt_bench",
        "--prompts",
        "humaneval",
        "--limit",
        "2",
        "--max-new-tokens",
        "10",
        "--temperature",
        "0",
        "1",
        "--max-draft-tokens",
        "2",
        "all",
        "--compare",
        "a@K=all,c=config",
        "b@K=all,c=config",
        "--bootstrap-replicates",
        "200",
        "--cache-dir",
        str(cache),
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(arguments) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["provenance"]["packages"]["torch"] and report["provenance"]["seeds"] == {
        "generation": 1,
        "bootstrap": 0,
    }
    for key in ("T0", "T1"):
        section = report[key]
        assert section["sequences"] == 4 and set(section["domains"]) == {"chat", "code"}
        assert set(section["acceptance"]) == {
            "a@K=2,c=config",
            "a@K=all,c=config",
            "b@K=2,c=config",
            "b@K=all,c=config",
        }
        overall = section["acceptance"]["a@K=all,c=config"]["all"]
        assert overall["acceptance_length"] >= 1.0 and len(overall["per_position_acceptance"]) == 4
        assert len(section["per_sequence"]["a@K=2,c=config"]) == 4
        # the same draft twice: identical numbers, and the paired comparison says so in words
        assert section["acceptance"]["a@K=all,c=config"] == section["acceptance"]["b@K=all,c=config"]
        assert (
            section["paired"]["all"]["includes_zero"]
            and "no significant difference" in section["paired"]["all"]["verdict"]
        )
        assert (out / f"per_position_{key}.png").stat().st_size > 1000
    assert "expectation" in report["T1"]["measure"] and "replay" in report["T0"]["measure"]
    assert report["T0"]["continuation_agreement"]["rate"] == 1.0
    markdown = (out / "eval.md").read_text()
    assert "| a@K=all,c=config |" in markdown and "teacher-forced expectation" in markdown
    folders = sorted(path.name for path in cache.iterdir())
    assert len(folders) == 4  # two prompt sets x two temperatures
    manifests = {name: (cache / name / "manifest.json").read_text() for name in folders}
    assert main(arguments) == 0  # a rerun reuses the cached answers
    assert {name: (cache / name / "manifest.json").read_text() for name in folders} == manifests


def test_dspark_eval_names_a_draft_that_does_not_fit(checkpoints, tmp_path, capsys):
    other = tiny_llama(seed=1, vocab_size=96)
    tiny_draft(other).save_pretrained(tmp_path / "wrong")
    code = main(
        [
            "eval",
            "--target",
            str(checkpoints / "target"),
            "--draft",
            f"wrong={tmp_path / 'wrong'}",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 2
    assert "draft 'wrong'" in capsys.readouterr().err


def test_dspark_bench_times_the_compiled_static_loop_on_a_batch(checkpoints, tmp_path):
    """`loop_static_compiled`: our static loop with its steps through torch.compile, compiled in the warm-up."""
    out = tmp_path / "bench"
    arguments = ["bench", "--target", str(checkpoints / "target"), "--draft", str(checkpoints / "draft")]
    arguments += ["--methods", "plain,loop_static_compiled", "--batch-sizes", "2", "--rounds", "1"]
    arguments += ["--max-new-tokens", "6", "--prompts", "mt_bench", "--limit", "1", "--bootstrap-replicates", "50"]
    assert main([*arguments, "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    compiled = json.loads((out / "bench.json").read_text())["local"]["summary"]["2"]["loop_static_compiled"]
    assert compiled["runs"] == 1 and compiled["failed_runs"] == 0
    assert compiled["token_match"]["rate"] == 1.0 and compiled["acceptance_length"] >= 1.0


def test_dspark_bench_runs_every_method_in_abba_order_and_checks_outputs(checkpoints, tmp_path):
    out = tmp_path / "bench"
    code = main(
        [
            "bench",
            "--target",
            str(checkpoints / "target"),
            "--draft",
            str(checkpoints / "draft"),
            "--methods",
            "plain,assisted,loop,loop_static,lookup",
            "--batch-sizes",
            "1",
            "2",
            "--rounds",
            "2",
            "--max-new-tokens",
            "6",
            "--prompts",
            "mt_bench",
            "--limit",
            "1",
            "--bootstrap-replicates",
            "100",
            "--device",
            "cpu",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads((out / "bench.json").read_text())
    single, double = report["local"]["summary"]["1"], report["local"]["summary"]["2"]
    assert set(single) == {"plain", "assisted", "loop", "loop_static", "lookup"}
    assert set(double) == {"plain", "loop", "loop_static"}
    for name in ("assisted", "loop", "loop_static", "lookup"):
        assert single[name]["runs"] == 2 and single[name]["failed_runs"] == 0
        assert single[name]["token_match"]["rate"] == 1.0, f"{name} must reproduce plain greedy in float32"
        assert single[name]["vs_plain"]["speedup"] > 0
    for name in ("loop", "loop_static"):  # our loop runs batches on both paths
        assert double[name]["token_match"]["rate"] == 1.0 and double[name]["acceptance_length"] >= 1.0
    assert set(report["local"]["skipped"]["2"]) == {"assisted", "lookup"}
    # written after batch size 1, before 2 started: what a benchmark killed by a time limit keeps
    partial = json.loads((out / "bench.partial.json").read_text())
    assert set(partial["local"]["summary"]) == {"1"} and partial["local"]["summary"]["1"] == single
    orders = [(m["workload"], m["round"], m["method"]) for m in report["local"]["measurements"] if m["batch_size"] == 1]
    assert [name for workload, _, name in orders if workload == 0] == [
        "plain",
        "assisted",
        "loop",
        "loop_static",
        "lookup",
        "lookup",
        "loop_static",
        "loop",
        "assisted",
        "plain",
    ]
    assert "skipped" in report["serving"]
    assert (out / "throughput.png").stat().st_size > 1000
    assert "| 1 | loop |" in (out / "bench.md").read_text()
