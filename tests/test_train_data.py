"""Training data: prompt files and generators, the evaluation leak check, on-policy answers with resume."""

from __future__ import annotations

import json

import pytest

from dspark.evaluation.prompt_sets import load_prompt_set
from dspark.train.prompts import (
    build_prompts,
    check_no_evaluation_leak,
    code_prompts,
    load_prompt_file,
    math_prompts,
    topic_prompts,
)
from dspark.train.responses import generate_responses, load_response_dataset


def test_prompt_files_in_every_supported_format_are_read(tmp_path):
    lines = [
        {"prompt": "Tell me a joke about cats."},
        {"turns": ["Hello there", "And a follow-up"]},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hi!"}]},
        {"conversations": [{"from": "human", "value": "What is rain?"}, {"from": "gpt", "value": "Water."}]},
        {"instruction": "Translate to French", "input": "good morning"},
    ]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    records = load_prompt_file(tmp_path / "p.jsonl")
    assert [r["turns"][0] for r in records] == [
        "Tell me a joke about cats.",
        "Hello there",
        "Hi!",
        "What is rain?",
        "Translate to French\n\ngood morning",
    ]
    (tmp_path / "p.json").write_text(json.dumps(lines[:2]))
    assert len(load_prompt_file(tmp_path / "p.json")) == 2


def test_bad_prompt_records_name_the_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "fine"}\n{"text": "no prompt field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: a prompt record needs"):
        load_prompt_file(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "fine"}\n{not json\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2 is not valid JSON"):
        load_prompt_file(tmp_path / "broken.jsonl")


def test_generators_are_deterministic_and_disjoint_from_the_evaluation_sets():
    assert topic_prompts(50, seed=3) == topic_prompts(50, seed=3)
    assert topic_prompts(50, seed=3) != topic_prompts(50, seed=4)
    records = build_prompts(["topics:300", "code:200", "math:200"], seed=0)
    assert {r["domain"] for r in records} == {"chat", "code", "math"}
    assert len({r["turns"][0] for r in records}) == len(records)
    check_no_evaluation_leak(records)  # does not raise
    assert len(code_prompts(100)) == 100 and len(math_prompts(100)) == 100


def test_the_leak_check_fires_on_evaluation_prompts_even_when_reformatted(tmp_path):
    mt_bench = load_prompt_set("mt_bench")[3]["turns"][0]
    humaneval = load_prompt_set("humaneval")[10]["raw"]
    clean = topic_prompts(20)
    leaked = clean + [
        {"id": "mine/1", "domain": "chat", "turns": ["  " + mt_bench.upper() + "  "], "raw": mt_bench},
        {"id": "mine/2", "domain": "code", "turns": ["Please solve this:\n" + humaneval], "raw": humaneval},
    ]
    with pytest.raises(ValueError, match=r"2 training prompts are evaluation prompts.*mine/1 = mt_bench/84"):
        check_no_evaluation_leak(leaked)
    (tmp_path / "leak.jsonl").write_text(json.dumps({"prompt": mt_bench}) + "\n")
    with pytest.raises(ValueError, match="evaluation prompts"):
        build_prompts([f"file:{tmp_path / 'leak.jsonl'}", "topics:10"])


class CharTokenizer:
    """A tiny offline tokenizer with a chat template: one id per character, ids 1/2 = start/end of turn."""

    pad_token_id = 2
    name_or_path = "char-tokenizer"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize, return_dict):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + (
            "<assistant>" if add_generation_prompt else ""
        )
        return {"input_ids": [1] + [3 + (ord(c) % 60) for c in text]}

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [3 + (ord(c) % 60) for c in text]}


@pytest.fixture(scope="module")
def tiny_target():
    from tiny_models import tiny_llama

    target = tiny_llama(seed=5, vocab_size=64)
    target.generation_config.eos_token_id = 2
    target.generation_config.pad_token_id = 2
    return target


def test_answers_are_written_resumable_and_equal_to_an_uninterrupted_run(tmp_path, tiny_target):
    prompts = topic_prompts(10, seed=1)
    settings = dict(
        batch_size=4, max_new_tokens=12, max_prompt_tokens=90, temperature=0.8, top_p=0.9, seed=7, progress=False
    )
    generate_responses(tiny_target, CharTokenizer(), prompts, tmp_path / "once", **settings)
    # "interrupted" after the first batch, then resumed with the full prompt list
    generate_responses(tiny_target, CharTokenizer(), prompts[:4], tmp_path / "twice", **settings)
    manifest = generate_responses(tiny_target, CharTokenizer(), prompts, tmp_path / "twice", **settings)
    once = load_response_dataset(tmp_path / "once", min_sequences=1)
    twice = load_response_dataset(tmp_path / "twice", min_sequences=1)
    assert once == twice
    kept = {r["id"] for r in once}
    assert kept | set(manifest["skipped_long"]) == {p["id"] for p in prompts}
    for record in once:
        assert record["prompt_length"] < len(record["input_ids"]) <= record["prompt_length"] + 12
        assert record["finish_reason"] in ("eos", "length")
        if record["finish_reason"] == "eos":
            assert record["input_ids"][-1] == 2


def test_long_prompts_are_skipped_and_counted_never_truncated(tmp_path, tiny_target):
    prompts = topic_prompts(6, seed=2)
    manifest = generate_responses(
        tiny_target,
        CharTokenizer(),
        prompts,
        tmp_path,
        batch_size=3,
        max_new_tokens=4,
        max_prompt_tokens=60,
        progress=False,
    )
    lengths = {
        p["id"]: len(
            CharTokenizer().apply_chat_template([{"role": "user", "content": p["turns"][0]}], True, True, True)[
                "input_ids"
            ]
        )
        for p in prompts
    }
    assert set(manifest["skipped_long"]) == {i for i, n in lengths.items() if n > 60}
    assert manifest["skipped_long"], "the test needs at least one long prompt"


def test_a_different_target_or_sampling_setting_cannot_resume_a_dataset(tmp_path, tiny_target):
    from tiny_models import tiny_llama

    prompts = topic_prompts(4, seed=1)
    generate_responses(
        tiny_target,
        CharTokenizer(),
        prompts,
        tmp_path,
        batch_size=4,
        max_new_tokens=4,
        max_prompt_tokens=200,
        progress=False,
    )
    with pytest.raises(ValueError, match="different sampling"):
        generate_responses(
            tiny_target,
            CharTokenizer(),
            prompts,
            tmp_path,
            batch_size=4,
            max_new_tokens=4,
            max_prompt_tokens=200,
            temperature=0.5,
            progress=False,
        )
    other = tiny_llama(seed=9, vocab_size=64)
    other.generation_config.eos_token_id = 2
    with pytest.raises(ValueError, match="different target"):
        generate_responses(
            other,
            CharTokenizer(),
            prompts,
            tmp_path,
            batch_size=4,
            max_new_tokens=4,
            max_prompt_tokens=200,
            progress=False,
        )


def test_tiny_missing_or_evaluation_datasets_are_clear_errors(tmp_path, tiny_target):
    with pytest.raises(FileNotFoundError, match="not a response dataset"):
        load_response_dataset(tmp_path / "nothing")
    generate_responses(
        tiny_target,
        CharTokenizer(),
        topic_prompts(3),
        tmp_path / "tiny",
        batch_size=3,
        max_new_tokens=4,
        max_prompt_tokens=200,
        progress=False,
    )
    with pytest.raises(ValueError, match="only 3 usable answered prompts"):
        load_response_dataset(tmp_path / "tiny")
    evaluation = load_prompt_set("mt_bench", limit=2)
    with pytest.raises(ValueError, match="evaluation prompts"):
        generate_responses(tiny_target, CharTokenizer(), evaluation, tmp_path / "eval", progress=False)
    generate_responses(
        tiny_target,
        CharTokenizer(),
        evaluation,
        tmp_path / "eval",
        batch_size=2,
        max_new_tokens=4,
        max_prompt_tokens=10_000,
        progress=False,
        allow_evaluation_prompts=True,
    )
    with pytest.raises(ValueError, match="never train on it"):
        load_response_dataset(tmp_path / "eval", min_sequences=1)
    assert len(load_response_dataset(tmp_path / "eval", min_sequences=1, for_training=False)) == 2
