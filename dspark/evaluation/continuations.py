"""The target's own answers to evaluation prompts, generated once and cached.

Offline acceptance needs the text the target itself writes: greedy at T=0 (so the loop replay is exact), sampled at
T>0. Answering is by far the slowest part of an evaluation, so the answers are cached in a folder keyed by everything
that determines them: the target (architecture, sizes, an embedding fingerprint, tokenizer), the prompt set and the
generation settings. A second `dspark eval` with the same target, set and settings reuses them; a larger `--limit`
answers only the new prompts (`generate_responses` resumes).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .prompt_sets import load_prompt_set

CACHE_ENV = "DSPARK_CACHE"


def default_cache_root() -> Path:
    """`$DSPARK_CACHE/continuations`, else `~/.cache/dspark/continuations`."""
    base = os.environ.get(CACHE_ENV)
    return (Path(base) if base else Path.home() / ".cache" / "dspark") / "continuations"


def continuation_key(target, tokenizer, prompt_set: str, settings: dict) -> str:
    """A short hash of (target identity, prompt set, generation settings): the cache folder's name suffix."""
    from ..train.responses import target_identity

    source = Path(prompt_set)
    prompt_source = prompt_set if not source.is_file() else f"{source.resolve()}:{source.stat().st_mtime_ns}"
    material = json.dumps(
        {"target": target_identity(target, tokenizer), "prompts": prompt_source, "settings": settings}, sort_keys=True
    )
    return hashlib.sha256(material.encode()).hexdigest()[:12]


def target_continuations(
    target,
    tokenizer,
    prompt_sets: list[str],
    *,
    limit: int | None,
    temperature: float,
    max_new_tokens: int,
    cache_root: str | Path | None = None,
    batch_size: int = 64,
    max_prompt_tokens: int = 2048,
    top_p: float | None = None,
    top_k: int | None = None,
    chat: bool = True,
    seed: int = 1,
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """The target's answers to the first `limit` prompts of each set (cached), and where they came from.

    Returns (records, info): records {id, domain, input_ids, prompt_length, finish_reason, prompt_set} in prompt-set
    order (prompts too long for `max_prompt_tokens` and one-token answers are left out and counted in info), and
    info {prompt_set: {folder, answered, skipped_long, settings}}.
    """
    from ..train.responses import generate_responses, load_response_dataset

    root = Path(cache_root) if cache_root is not None else default_cache_root()
    settings = {
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "max_new_tokens": max_new_tokens,
        "max_prompt_tokens": max_prompt_tokens,
        "chat": chat,
        "seed": seed,
        "batch_size": batch_size,
    }
    records, info = [], {}
    for name in prompt_sets:
        prompts = load_prompt_set(name, limit=limit)
        folder = root / f"{Path(name).stem}-{continuation_key(target, tokenizer, name, settings)}"
        manifest = generate_responses(
            target,
            tokenizer,
            prompts,
            folder,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            max_prompt_tokens=max_prompt_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            chat=chat,
            seed=seed,
            progress=progress,
            allow_evaluation_prompts=True,
        )
        by_id = {record["id"]: record for record in load_response_dataset(folder, min_sequences=0, for_training=False)}
        chosen = [{**by_id[p["id"]], "prompt_set": name} for p in prompts if p["id"] in by_id]
        wanted = {p["id"] for p in prompts}
        info[name] = {
            "folder": str(folder),
            "answered": len(chosen),
            "skipped_long": sorted(set(manifest["skipped_long"]) & wanted),
            "too_short": len(wanted) - len(chosen) - len(set(manifest["skipped_long"]) & wanted),
            "settings": settings,
        }
        records += chosen
    if not records:
        raise ValueError(
            f"dspark: no usable answers for {', '.join(prompt_sets)} (every prompt was too long for "
            f"max_prompt_tokens={max_prompt_tokens} or answered with a single token)."
        )
    return records, info
