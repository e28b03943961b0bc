"""On-policy answers: the target answers the training prompts itself, cached on disk as token ids, resumable.

A dataset folder holds `manifest.json` and shards `shard-00000.jsonl`, ... of one JSON record per line:

    {"id": str, "domain": str, "input_ids": [int, ...], "prompt_length": int, "finish_reason": "eos" | "length"}

`input_ids` is the prompt (chat template applied, unless raw) followed by the answer, without padding; the answer
ends with its stop token when `finish_reason` is "eos". Loss-mask convention: answer tokens are the positions
`>= prompt_length` (`response_mask`).

The manifest says who answered (target and tokenizer identity), how (sampling settings, seeds, batch sizes, prompt
sources of every run), what is done (prompt id -> prompt fingerprint) and counts. Rerunning into the same folder skips
answered prompts; batch `b` of the prompt list is sampled after `torch.manual_seed(seed + b)`, so a run interrupted
between batches and rerun gives the records of an uninterrupted run. A different target, tokenizer or sampling
distribution is refused, so that one folder never mixes two distributions. Files are written to a temporary name and
renamed, so a kill leaves either the old or the new state. One process per folder at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch

from .prompts import check_no_evaluation_leak, check_unique_ids

MANIFEST_NAME = "manifest.json"
DATASET_FORMAT = "dspark-responses"
FORMAT_VERSION = 1
FINISH_REASONS = ("eos", "length")
# Training needs an anchor inside the answer and at least one answer token after it.
MIN_RESPONSE_TOKENS = 2
MIN_SEQUENCES = 8
_EMBEDDING_ROWS_HASHED = 256
_TOKENIZER_PROBE = "Hello, world! Ünïcödé 123 def f(x):\n    return x ** 2  # 你好"


# ======================================================================================================================
# Identity of target, tokenizer and sampling
# ======================================================================================================================


def target_identity(target, tokenizer=None) -> dict:
    """What tells two targets apart: classes, sizes, dtype, and a hash of evenly spaced rows of the input embedding;
    with `tokenizer`, also its `tokenizer_identity` (under "tokenizer").

    Hashing a few hundred rows (not the whole matrix) is enough to tell two checkpoints apart and stays fast for
    150k x 8k embeddings on a GPU. `name_or_path` is recorded but not compared (the same model may move).
    """
    config = target.config.get_text_config()
    weight = target.get_input_embeddings().weight.detach()
    rows = torch.linspace(0, weight.shape[0] - 1, min(_EMBEDDING_ROWS_HASHED, weight.shape[0])).long()
    # float32 holds bf16/fp16 values exactly, so the hash is the same on every device for one dtype
    sample = weight[rows.to(weight.device)].float().cpu().contiguous()
    digest = hashlib.sha256(str(tuple(weight.shape)).encode() + sample.numpy().tobytes()).hexdigest()
    return {
        "model_class": type(target).__name__,
        "config_class": type(target.config).__name__,
        "name_or_path": getattr(target.config, "_name_or_path", "") or "",
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "vocab_size": config.vocab_size,
        "dtype": str(weight.dtype).removeprefix("torch."),
        "embedding_sha256": digest[:32],
        **({"tokenizer": tokenizer_identity(tokenizer)} if tokenizer is not None else {}),
    }


def tokenizer_identity(tokenizer) -> dict:
    """Name, class, vocabulary size, chat template hash and the ids of a probe text (catches same-size vocabularies
    that split text differently)."""
    template = getattr(tokenizer, "chat_template", None)
    probe = tokenizer(_TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    return {
        "class": type(tokenizer).__name__,
        "name_or_path": getattr(tokenizer, "name_or_path", "") or "",
        "vocab_size": len(tokenizer),
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()[:16] if template else None,
        "probe_sha256": hashlib.sha256(json.dumps(list(probe)).encode()).hexdigest()[:16],
    }


def sampling_settings(
    temperature: float, top_p: float | None, top_k: int | None, max_new_tokens: int, chat: bool, stop_ids: list[int]
) -> dict:
    """The settings that define the answer distribution, as they are applied (None = that filter is off)."""
    if temperature < 0:
        raise ValueError(f"dspark: temperature must be >= 0 (0 = greedy), got {temperature}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"dspark: top_p must be in (0, 1], got {top_p}.")
    if top_k is not None and top_k < 0:
        raise ValueError(f"dspark: top_k must be >= 0 (0 = off), got {top_k}.")
    if max_new_tokens < 1:
        raise ValueError(f"dspark: max_new_tokens must be >= 1, got {max_new_tokens}.")
    greedy = temperature == 0
    return {
        "temperature": float(temperature),
        "top_p": None if greedy or top_p in (None, 1.0) else float(top_p),
        "top_k": None if greedy or not top_k else int(top_k),
        "max_new_tokens": int(max_new_tokens),
        "chat_template": bool(chat),
        "stop_token_ids": sorted(stop_ids),
    }


def stop_token_ids(target, tokenizer, eos_token_id: int | Sequence[int] | None = None) -> list[int]:
    """Ids that end an answer: `eos_token_id` if given, else the target's generation config, else the tokenizer's."""
    for candidate in (eos_token_id, target.generation_config.eos_token_id, getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            ids = [candidate] if isinstance(candidate, int) else list(candidate)
            if ids:
                return sorted({int(i) for i in ids})
    raise ValueError(
        "dspark: no end-of-answer token: the target's generation_config and the tokenizer have no eos_token_id. "
        "Pass eos_token_id (--eos-token-id)."
    )


def pad_token_id_for(tokenizer, stop_ids: Sequence[int]) -> int:
    """Padding id for left-padded batches. Any id works (padding is masked and never stored); the tokenizer's if set."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else int(stop_ids[0])


# ======================================================================================================================
# Encoding and batched generation
# ======================================================================================================================


def encode_prompt(tokenizer, record: dict, chat: bool) -> list[int]:
    """Prompt token ids: the first user turn through the chat template (with the generation prompt), or `raw` text.

    Only the first turn is answered: later user turns were written against someone else's answer to the first, so
    they are not on-policy context for this target.
    """
    if chat:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"dspark: the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; answer the "
                "prompts as plain text with chat=False (--raw), or use a chat model's tokenizer."
            )
        messages = [{"role": "user", "content": record["turns"][0]}]
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return [int(token) for token in encoded["input_ids"]]
    return [int(token) for token in tokenizer(record["raw"], add_special_tokens=True)["input_ids"]]


def _plain_generation_config(
    stop_ids: list[int],
    pad_token_id: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
):
    """A generation config holding only our settings. `top_k=0`/`top_p=1` switch those filters off explicitly:
    transformers would otherwise fill them from the model's generation config or its global defaults (top_k=50)."""
    from transformers import GenerationConfig

    common = {"max_new_tokens": max_new_tokens, "eos_token_id": stop_ids, "pad_token_id": pad_token_id}
    if temperature == 0:
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p or 1.0, top_k=top_k or 0, **common)


def _cut_at_stop(answer: list[int], stop_ids: set[int]) -> tuple[list[int], str]:
    """The answer up to and including its first stop token (the draft must learn to propose it too)."""
    for index, token in enumerate(answer):
        if token in stop_ids:
            return answer[: index + 1], "eos"
    return answer, "length"


@torch.no_grad()
def generate_batch(
    target,
    prompt_ids: Sequence[Sequence[int]],
    *,
    stop_ids: list[int],
    pad_token_id: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    seed: int,
) -> list[tuple[list[int], str]]:
    """Answers to a batch of prompts: left padding, one `target.generate` call after `torch.manual_seed(seed)`.

    prompt_ids: B lists of token ids (any lengths). Returns B (answer ids, finish reason) pairs. The caller's RNG
    state and the target's generation config are left as they were.
    """
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    device = target.device
    config = _plain_generation_config(stop_ids, pad_token_id, max_new_tokens, temperature, top_p, top_k)
    # generate() fills unset fields from target.generation_config (a hub config may set repetition_penalty, top_k,
    # ...); swapping in ours for the call makes the recorded settings the whole truth.
    saved_config = target.generation_config
    target.generation_config = config
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(seed)
            output = target.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
            )
    finally:
        target.generation_config = saved_config
    stops = set(stop_ids)
    return [_cut_at_stop(row, stops) for row in output[:, width:].tolist()]


# ======================================================================================================================
# The dataset folder
# ======================================================================================================================


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def read_manifest(out_dir: str | Path) -> dict | None:
    """The folder's manifest, or None if there is none."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"dspark: {path} is not valid JSON ({error.msg}); the dataset is damaged.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != DATASET_FORMAT:
        raise ValueError(
            f"dspark: {path} is not a {DATASET_FORMAT} manifest (written by another tool or an older dspark). "
            "Use a new folder, or --overwrite to start this one again."
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"dspark: {path} has format version {manifest.get('format_version')}; this dspark reads {FORMAT_VERSION}."
        )
    return manifest


def _prompt_key(record: dict, chat: bool) -> str:
    """Short fingerprint of the text the target is asked: ties a done id to its prompt text."""
    text = record["turns"][0] if chat else record["raw"]
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _differences(saved: dict, current: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    return [
        f"{key}: {saved.get(key)!r} in the dataset, {current.get(key)!r} now"
        for key in sorted(set(saved) | set(current))
        if key not in ignore and saved.get(key) != current.get(key)
    ]


def _check_resumable(manifest: dict, fresh: dict, out_dir: Path) -> None:
    """Refuse to add answers from another target, tokenizer or sampling distribution to an existing dataset."""
    problems = []
    for part, ignore in (("target", ("name_or_path",)), ("tokenizer", ("name_or_path", "class")), ("sampling", ())):
        problems += [f"{part} {difference}" for difference in _differences(manifest[part], fresh[part], ignore)]
    if manifest["evaluation_prompts"] != fresh["evaluation_prompts"]:
        kind = {True: "evaluation", False: "training"}
        problems.append(
            f"prompts: {kind[manifest['evaluation_prompts']]} in the dataset, {kind[fresh['evaluation_prompts']]} now"
        )
    if problems:
        raise ValueError(
            f"dspark: {out_dir} holds answers made with a different target, tokenizer or sampling settings "
            f"({'; '.join(problems)}). One folder holds one answer distribution: use a new --out folder, rerun with "
            "the dataset's settings, or pass --overwrite (overwrite=True) to discard its answers."
        )


def _new_manifest(fresh: dict) -> dict:
    from .. import __version__

    return {
        "format": DATASET_FORMAT,
        "format_version": FORMAT_VERSION,
        "dspark_version": __version__,
        "created": _now(),
        "updated": _now(),
        **fresh,
        "runs": [],
        "counts": dict.fromkeys(
            ("answered", "skipped_long", "finish_eos", "finish_length", "prompt_tokens", "response_tokens"), 0
        ),
        "shards": [],
        "done": {},
        "skipped_long": {},
    }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _count(manifest: dict, rows: list[dict]) -> None:
    """Bring the manifest's counts up to date after a batch whose new records are `rows`."""
    counts = manifest["counts"]
    counts["answered"] = len(manifest["done"])
    counts["skipped_long"] = len(manifest["skipped_long"])
    for row in rows:
        counts[f"finish_{row['finish_reason']}"] += 1
        counts["prompt_tokens"] += row["prompt_length"]
        counts["response_tokens"] += len(row["input_ids"]) - row["prompt_length"]


def _open_dataset(out_dir: Path, fresh: dict, prompts: list[dict], chat: bool, overwrite: bool) -> dict:
    """The manifest to continue: a new one, or the folder's after checking that these answers may join it."""
    if overwrite:  # by name only, without reading: a damaged or foreign manifest must not block a fresh start
        for path in [out_dir / MANIFEST_NAME, *out_dir.glob("shard-*.jsonl")]:
            path.unlink(missing_ok=True)
    manifest = read_manifest(out_dir)
    if manifest is None:
        return _new_manifest(fresh)
    _check_resumable(manifest, fresh, out_dir)
    done = manifest["done"]
    changed = [p["id"] for p in prompts if p["id"] in done and done[p["id"]] != _prompt_key(p, chat)]
    if changed:
        raise ValueError(
            f"dspark: {len(changed)} prompt ids already answered in {out_dir} now name different prompt text "
            f"(e.g. {changed[:3]}): prompts built with another seed or file? Use a new --out folder, or --overwrite."
        )
    return manifest


@torch.no_grad()
def generate_responses(
    target,
    tokenizer,
    prompts: Sequence[dict],
    out_dir: str | Path,
    *,
    batch_size: int = 64,
    max_new_tokens: int = 384,
    max_prompt_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    chat: bool = True,
    seed: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    prompt_source: str | None = None,
    allow_evaluation_prompts: bool = False,
) -> dict:
    """Have `target` answer `prompts` in batches and add the answers to the dataset in `out_dir`; returns the manifest.

    prompts: records with `id`, `domain`, `turns` (chat) or `raw` (chat=False); ids must be unique. temperature 0 is
    greedy; top_p/top_k None mean off. Batch `b` holds prompts `b*batch_size ... (b+1)*batch_size - 1` and is
    sampled after `torch.manual_seed(seed + b)`; batches already answered are skipped, so rerunning resumes. Prompts
    longer than `max_prompt_tokens` are skipped, counted and warned about, never truncated (a rerun with a larger
    limit answers them). `eos_token_id` defaults to the target's generation config. Evaluation prompts are refused
    unless `allow_evaluation_prompts` (evaluation runs answer them on purpose; their folders are marked so, and
    `load_response_dataset` refuses to train on them).
    """
    if batch_size < 1 or max_prompt_tokens < 1:
        raise ValueError(
            f"dspark: batch_size and max_prompt_tokens must be >= 1 (got {batch_size}, {max_prompt_tokens})."
        )
    prompts = list(prompts)
    check_unique_ids(prompts)
    if not allow_evaluation_prompts:
        check_no_evaluation_leak(prompts)
    out_dir = Path(out_dir)
    stop_ids = stop_token_ids(target, tokenizer, eos_token_id)
    pad_id = pad_token_id_for(tokenizer, stop_ids)
    fresh = {
        "target": target_identity(target),
        "tokenizer": tokenizer_identity(tokenizer),
        "sampling": sampling_settings(temperature, top_p, top_k, max_new_tokens, chat, stop_ids),
        "evaluation_prompts": bool(allow_evaluation_prompts),
    }
    manifest = _open_dataset(out_dir, fresh, prompts, chat, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = {
        "started": _now(),
        "prompt_source": prompt_source,
        "prompts": len(prompts),
        "seed": seed,
        "batch_size": batch_size,
        "max_prompt_tokens": max_prompt_tokens,
        "answered": 0,
    }
    manifest["runs"].append(run)

    def pending(record: dict) -> bool:
        skipped_length = manifest["skipped_long"].get(record["id"])
        return record["id"] not in manifest["done"] and (skipped_length is None or skipped_length <= max_prompt_tokens)

    todo_count = sum(pending(record) for record in prompts)
    meter = _ProgressMeter(todo_count, enabled=progress)
    skipped_now: list[str] = []
    for batch_index in range(math.ceil(len(prompts) / batch_size)):
        batch = [r for r in prompts[batch_index * batch_size : (batch_index + 1) * batch_size] if pending(r)]
        if not batch:
            continue
        encoded = [(record, encode_prompt(tokenizer, record, chat)) for record in batch]
        fitting = [(record, ids) for record, ids in encoded if len(ids) <= max_prompt_tokens]
        for record, ids in encoded:
            if len(ids) > max_prompt_tokens:
                manifest["skipped_long"][record["id"]] = len(ids)
                skipped_now.append(record["id"])
        rows = []
        if fitting:
            answers = generate_batch(
                target,
                [ids for _, ids in fitting],
                stop_ids=stop_ids,
                pad_token_id=pad_id,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                seed=seed + batch_index,
            )
            for (record, ids), (answer, finish_reason) in zip(fitting, answers, strict=True):
                rows.append(
                    {
                        "id": record["id"],
                        "domain": record.get("domain", "chat"),
                        "input_ids": ids + answer,
                        "prompt_length": len(ids),
                        "finish_reason": finish_reason,
                    }
                )
            shard = f"shard-{len(manifest['shards']):05d}.jsonl"
            # shard first, then the manifest that lists it: a kill in between leaves an unlisted shard that the
            # next run overwrites under the same name
            _write_atomic(out_dir / shard, "".join(json.dumps(row) + "\n" for row in rows))
            manifest["shards"].append({"file": shard, "records": len(rows)})
            for record, _ in fitting:
                manifest["done"][record["id"]] = _prompt_key(record, chat)
                manifest["skipped_long"].pop(record["id"], None)
        run["answered"] += len(rows)
        manifest["updated"] = _now()
        _count(manifest, rows)
        _write_atomic(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=1))
        meter.update(len(batch), sum(len(row["input_ids"]) - row["prompt_length"] for row in rows))
    meter.close()
    if not todo_count:  # nothing new: keep the manifest as it was, without an empty run entry
        manifest["runs"].pop()
    if skipped_now:
        warnings.warn(
            f"dspark: skipped {len(skipped_now)} prompts longer than max_prompt_tokens={max_prompt_tokens} tokens "
            f"(e.g. {skipped_now[:3]}); they are listed under `skipped_long` in {out_dir / MANIFEST_NAME}. Raise "
            "--max-prompt-tokens and rerun to answer them.",
            stacklevel=2,
        )
    return manifest


class _ProgressMeter:
    """A tqdm bar with prompts/s and answer tokens/s; a line every 30 s on stderr when tqdm is not installed."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.tokens = total, 0, 0
        self.started = self.last_line = time.perf_counter()
        self.bar = None
        self.enabled = enabled and total > 0
        if self.enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc="answering", unit="prompt", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, prompts: int, tokens: int) -> None:
        if not self.enabled:
            return
        self.done += prompts
        self.tokens += tokens
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rates = {"prompts_s": f"{self.done / elapsed:.2f}", "tok_s": f"{self.tokens / elapsed:.0f}"}
        if self.bar is not None:
            self.bar.update(prompts)
            self.bar.set_postfix(rates)
        elif time.perf_counter() - self.last_line > 30 or self.done == self.total:
            self.last_line = time.perf_counter()
            print(f"answered {self.done}/{self.total} prompts, {rates}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ======================================================================================================================
# Reading a dataset
# ======================================================================================================================


def _validate_record(record: object, where: str, vocab_size: int) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"dspark: {where}: expected a JSON object; the dataset is damaged.")
    missing = [key for key in ("id", "domain", "input_ids", "prompt_length", "finish_reason") if key not in record]
    if missing:
        raise ValueError(f"dspark: {where}: record lacks {missing}; the dataset is damaged.")
    ids, prompt_length = record["input_ids"], record["prompt_length"]
    if not isinstance(ids, list) or not all(type(token) is int for token in ids):
        raise ValueError(f"dspark: {where}: input_ids must be a list of integers; the dataset is damaged.")
    if ids and not 0 <= min(ids) <= max(ids) < vocab_size:
        raise ValueError(f"dspark: {where}: token ids outside the target's vocabulary of {vocab_size}.")
    if type(prompt_length) is not int or not 0 < prompt_length < len(ids):
        raise ValueError(
            f"dspark: {where}: prompt_length {prompt_length!r} leaves no answer in {len(ids)} tokens; the dataset "
            "is damaged."
        )
    if record["finish_reason"] not in FINISH_REASONS:
        raise ValueError(f"dspark: {where}: finish_reason must be one of {FINISH_REASONS}.")
    return record


def load_response_dataset(
    out_dir: str | Path, min_sequences: int = MIN_SEQUENCES, for_training: bool = True
) -> list[dict]:
    """The usable records of a dataset folder (answers of at least `MIN_RESPONSE_TOKENS` tokens), in answer order.

    Validates every record against the manifest. Clear errors for a missing folder, a damaged dataset, too few
    usable records (fewer than `min_sequences`), and, when `for_training`, a folder of answers to evaluation prompts.
    """
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise FileNotFoundError(
            f"dspark: {out_dir} is not a response dataset (no {MANIFEST_NAME}); create one with "
            "`dspark data respond --prompts PROMPTS.jsonl --out FOLDER`."
        )
    if for_training and manifest["evaluation_prompts"]:
        raise ValueError(
            f"dspark: {out_dir} holds answers to evaluation prompts (made for evaluation); never train on it."
        )
    vocab_size = manifest["target"]["vocab_size"]
    records: list[dict] = []
    for shard in manifest["shards"]:
        path = out_dir / shard["file"]
        if not path.is_file():
            raise FileNotFoundError(f"dspark: {path} is listed in the manifest but missing; the dataset is damaged.")
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(lines) != shard["records"]:
            raise ValueError(
                f"dspark: {path} holds {len(lines)} records, the manifest says {shard['records']}; the dataset is "
                "damaged."
            )
        for number, line in enumerate(lines, 1):
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"dspark: {path}:{number} is not valid JSON ({error.msg}).") from None
            records.append(_validate_record(item, f"{path}:{number}", vocab_size))
    if len({record["id"] for record in records}) != len(records):
        raise ValueError(f"dspark: {out_dir} holds the same prompt id twice; the dataset is damaged.")
    usable = [r for r in records if len(r["input_ids"]) - r["prompt_length"] >= MIN_RESPONSE_TOKENS]
    if len(usable) < min_sequences:
        raise ValueError(
            f"dspark: {out_dir} has {len(usable)} usable answered prompts ({len(records)} answered, "
            f"{len(records) - len(usable)} with fewer than {MIN_RESPONSE_TOKENS} answer tokens); at least "
            f"{min_sequences} are needed, and thousands to train a useful draft. Answer more prompts with "
            f"`dspark data respond --out {out_dir} ...` (it resumes)."
        )
    return usable


def response_mask(record: dict) -> torch.Tensor:
    """[T] bool: True at answer positions (`>= prompt_length`), where the training loss applies."""
    mask = torch.zeros(len(record["input_ids"]), dtype=torch.bool)
    mask[record["prompt_length"] :] = True
    return mask
