"""Evaluation prompt sets vendored in the package (MT-bench, HumanEval, MMATH-en) and user JSONL files.

Every record is a dict with at least `id`, `domain` and `turns` (user messages); `raw` holds the text used in raw
(completion) mode. Licences: prompt_sets/LICENSES.md; rebuild with scripts/vendor_prompt_sets.py.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

PROMPT_SET_DIR = Path(__file__).parent / "prompt_sets"
BUILTIN_PROMPT_SETS = {"mt_bench": "chat", "humaneval": "code", "mmath_en": "math"}


def load_prompt_set(name_or_path: str | Path, limit: int | None = None) -> list[dict]:
    """Records of a built-in set (`mt_bench`, `humaneval`, `mmath_en`) or of a user JSONL file.

    A user file needs one JSON object per line with `prompt` (a string) or `turns` (a list of strings) or
    `messages` (chat messages; the user turns are taken); `id` and `domain` are optional.
    """
    name = str(name_or_path)
    if name in BUILTIN_PROMPT_SETS:
        path = PROMPT_SET_DIR / f"{name}.jsonl"
        default_domain = BUILTIN_PROMPT_SETS[name]
    else:
        path = Path(name)
        default_domain = path.stem
        if not path.is_file():
            raise FileNotFoundError(
                f"dspark: no prompt set {name!r}: not a built-in set ({', '.join(BUILTIN_PROMPT_SETS)}) "
                "and no such file."
            )
    records = []
    with open(path) as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"dspark: {path}:{line_number} is not valid JSON ({error.msg}).") from None
            records.append(
                normalize_record(item, default_domain, f"{path.stem}/{line_number}", f"{path}:{line_number}")
            )
            if limit is not None and len(records) >= limit:
                break
    if not records:
        raise ValueError(f"dspark: prompt set {path} is empty.")
    return records


def normalize_record(item: dict, default_domain: str, default_id: str, where: str) -> dict:
    """Bring a prompt record to the common schema (id, domain, turns, raw)."""
    if not isinstance(item, dict):
        raise ValueError(f"dspark: {where}: expected a JSON object, got {type(item).__name__}.")
    if "turns" in item:
        turns = item["turns"]
    elif "prompt" in item:
        turns = [item["prompt"]]
    elif "messages" in item:
        turns = [message["content"] for message in item["messages"] if message.get("role") == "user"]
    else:
        raise ValueError(f"dspark: {where}: a prompt record needs `prompt`, `turns` or `messages`.")
    if not turns or not all(isinstance(turn, str) and turn.strip() for turn in turns):
        raise ValueError(f"dspark: {where}: the prompt is empty or not text.")
    record = dict(item)
    record["turns"] = list(turns)
    record.setdefault("id", default_id)
    record.setdefault("domain", default_domain)
    record.setdefault("raw", turns[0])
    return record


def prompt_fingerprint(text: str) -> str:
    """Hash of a prompt that ignores case, whitespace and punctuation, so trivial edits do not hide a leak."""
    canonical = re.sub(r"[\W_]+", " ", text.lower()).strip()
    return hashlib.sha256(canonical.encode()).hexdigest()


def evaluation_fingerprints() -> dict[str, str]:
    """Fingerprint -> record id of every prompt text (all turns and the raw form) in the built-in sets."""
    fingerprints = {}
    for name in BUILTIN_PROMPT_SETS:
        for record in load_prompt_set(name):
            for text in [*record["turns"], record["raw"]]:
                fingerprints[prompt_fingerprint(text)] = record["id"]
    return fingerprints
