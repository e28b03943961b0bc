"""On-policy answers: the target answers the training prompts itself; cached to disk as token ids, resumable.

A dataset folder holds `manifest.json` (who answered and how) and `shard-XXXXX.jsonl` files of records
{id, domain, input_ids (prompt + answer, unpadded), prompt_length, finish_reason: "eos" | "length"}.
Response tokens (the loss mask) are positions >= prompt_length. Rerunning into the same folder skips prompts that
are already answered; a different target or different sampling settings is refused, so one folder never mixes
two distributions.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from .prompts import check_no_evaluation_leak

MANIFEST = "manifest.json"
MIN_SEQUENCES = 8


def target_identity(target, tokenizer) -> dict:
    """Enough to tell two targets apart: architecture, sizes, and a hash of (a slice of) the embedding weights."""
    config = target.config.get_text_config()
    embedding = target.get_input_embeddings().weight
    sample = embedding[:: max(1, embedding.shape[0] // 64), :64].detach().float().cpu().contiguous()
    return {
        "class": type(target).__name__,
        "name_or_path": getattr(target.config, "_name_or_path", ""),
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "vocab_size": config.vocab_size,
        "embedding_fingerprint": hashlib.sha256(sample.numpy().round(3).tobytes()).hexdigest()[:16],
        "tokenizer": getattr(tokenizer, "name_or_path", type(tokenizer).__name__),
    }


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def read_manifest(out_dir: str | Path) -> dict | None:
    path = Path(out_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def encode_prompt(tokenizer, record: dict, chat: bool) -> list[int]:
    if chat:
        messages = [{"role": "user", "content": record["turns"][0]}]
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(encoded["input_ids"])
    return tokenizer(record["raw"], add_special_tokens=True)["input_ids"]


@torch.no_grad()
def generate_responses(
    target,
    tokenizer,
    prompts: list[dict],
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
    eos_token_id: int | list[int] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    allow_evaluation_prompts: bool = False,
) -> dict:
    """Answer `prompts` with `target` in batches (left padding) and append them to the dataset in `out_dir`.

    temperature 0 means greedy. Batch i is sampled after `torch.manual_seed(seed + i)`, so a resumed run draws what
    an uninterrupted one would have. Prompts longer than `max_prompt_tokens` are skipped and counted, never truncated.
    Returns the manifest. Evaluation prompts are refused unless `allow_evaluation_prompts` (for evaluation runs,
    which answer them on purpose; such a folder is marked so that it cannot be mistaken for training data).
    """
    if not allow_evaluation_prompts:
        check_no_evaluation_leak(prompts)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    eos = eos_token_id if eos_token_id is not None else target.generation_config.eos_token_id
    stop_ids = set(eos if isinstance(eos, list) else [eos])
    sampling = {
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "max_new_tokens": max_new_tokens,
        "max_prompt_tokens": max_prompt_tokens,
        "chat": chat,
        "seed": seed,
        "batch_size": batch_size,
        "eos_token_id": sorted(stop_ids),
        "evaluation_prompts": allow_evaluation_prompts,
    }
    identity = target_identity(target, tokenizer)
    manifest = read_manifest(out_dir)
    if manifest is not None and not overwrite:
        for key, mine in (("target", identity), ("sampling", sampling)):
            if manifest[key] != mine:
                raise ValueError(
                    f"dspark: {out_dir} holds answers made with a different {key} ({manifest[key]} vs {mine}). "
                    "Use a new folder, or pass overwrite=True (--overwrite) to start it again."
                )
    if manifest is None or overwrite:
        for shard in out_dir.glob("shard-*.jsonl"):
            shard.unlink()
        manifest = {
            "target": identity,
            "sampling": sampling,
            "done_ids": [],
            "skipped_long": [],
            "shards": [],
            "counts": {},
        }
    done = set(manifest["done_ids"]) | set(manifest["skipped_long"])
    todo = [record for record in prompts if record["id"] not in done]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids)
    bar = _progress_bar(len(todo), progress)
    started, new_tokens = time.perf_counter(), 0
    for start in range(0, len(todo), batch_size):
        batch_index = len(manifest["shards"])
        chunk = todo[start : start + batch_size]
        encoded = [(record, encode_prompt(tokenizer, record, chat)) for record in chunk]
        fitting = [(record, ids) for record, ids in encoded if len(ids) <= max_prompt_tokens]
        manifest["skipped_long"] += [record["id"] for record, ids in encoded if len(ids) > max_prompt_tokens]
        rows = []
        if fitting:
            width = max(len(ids) for _, ids in fitting)
            input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for _, ids in fitting], device=target.device)
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids in fitting], device=target.device)
            torch.manual_seed(seed + batch_index)
            sampling_kwargs = (
                {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k}
                if temperature > 0
                else {"do_sample": False}
            )
            out = target.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                eos_token_id=sorted(stop_ids),
                pad_token_id=pad_id,
                **sampling_kwargs,
            )
            for (record, ids), answer in zip(fitting, out[:, width:].tolist()):
                answer, finish = _cut_at_stop(answer, stop_ids)
                new_tokens += len(answer)
                rows.append(
                    {
                        "id": record["id"],
                        "domain": record.get("domain", "chat"),
                        "input_ids": ids + answer,
                        "prompt_length": len(ids),
                        "finish_reason": finish,
                    }
                )
        shard = f"shard-{batch_index:05d}.jsonl"
        _write_atomic(out_dir / shard, "".join(json.dumps(row) + "\n" for row in rows))
        manifest["shards"].append(shard)
        manifest["done_ids"] += [row["id"] for row in rows]
        manifest["counts"] = {"answered": len(manifest["done_ids"]), "skipped_long": len(manifest["skipped_long"])}
        _write_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=1))
        if bar is not None:
            elapsed = time.perf_counter() - started
            bar.update(len(chunk))
            bar.set_postfix(tok_s=f"{new_tokens / elapsed:.0f}", prompts_s=f"{(start + len(chunk)) / elapsed:.1f}")
    if bar is not None:
        bar.close()
    if manifest["skipped_long"]:
        print(f"dspark: skipped {len(manifest['skipped_long'])} prompts longer than {max_prompt_tokens} tokens")
    return manifest


def _cut_at_stop(answer: list[int], stop_ids: set[int]) -> tuple[list[int], str]:
    """Keep the answer up to and including its first stop token (the draft must learn to propose it too)."""
    for index, token in enumerate(answer):
        if token in stop_ids:
            return answer[: index + 1], "eos"
    return answer, "length"


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="answering", dynamic_ncols=True)


def load_response_dataset(
    out_dir: str | Path, min_sequences: int = MIN_SEQUENCES, for_training: bool = True
) -> list[dict]:
    """All records of a dataset folder, validated; a clear error for a missing, empty or tiny dataset, and for
    training on a folder of answers to evaluation prompts."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise FileNotFoundError(
            f"dspark: {out_dir} is not a response dataset (no {MANIFEST}); create one with `dspark data respond`."
        )
    if for_training and manifest["sampling"].get("evaluation_prompts"):
        raise ValueError(
            f"dspark: {out_dir} holds answers to evaluation prompts (made for `dspark eval`); never train on it."
        )
    records = []
    for shard in manifest["shards"]:
        path = out_dir / shard
        if not path.is_file():
            raise FileNotFoundError(f"dspark: {path} is listed in the manifest but missing; the dataset is damaged.")
        for number, line in enumerate(path.read_text().splitlines(), 1):
            record = json.loads(line)
            if not 0 < record["prompt_length"] < len(record["input_ids"]):
                raise ValueError(f"dspark: {path}:{number} has no response tokens; the dataset is damaged.")
            records.append(record)
    usable = [r for r in records if len(r["input_ids"]) - r["prompt_length"] >= 2]
    if len(usable) < min_sequences:
        raise ValueError(
            f"dspark: {out_dir} has only {len(usable)} usable answered prompts (need at least {min_sequences}, and "
            "thousands to train a useful draft). Answer more prompts with `dspark data respond`."
        )
    return usable
