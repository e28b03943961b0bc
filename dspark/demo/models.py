"""Load the demo's target + draft once, with errors a person can act on, and warm both decoding paths up.

A draft reference is checked before the (slow) target load, so a mistyped path fails in a second, not after
minutes. Warming up matters for the comparison: the first forward passes pay one-off costs (allocations, kernel
choice) that would otherwise be charged to the first visitor's speculative run.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import pair
from .handlers import RAW, DemoLimits, DemoSession, GenerationSettings

WARM_UP_TEXT = "Hello"
WARM_UP_TOKENS = 4


class DemoLoadError(ValueError):
    """The target or draft could not be loaded; the message says which and why."""


def check_draft_reference(name: str) -> None:
    """Fail fast on a draft that is neither the embedded default, nor a checkpoint directory, nor a hub repo id."""
    if name == pair.DEFAULT_DRAFT:
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DemoLoadError(f"dspark demo: the draft directory {path} has no config.json; is it a DSpark draft?")
        return
    if path.exists():
        raise DemoLoadError(f"dspark demo: the draft {path} is a file; pass the checkpoint directory.")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise DemoLoadError(
            f"dspark demo: draft {name!r} not found: no such directory, and not a hub repo id either."
        ) from None


def load_session(
    target: str = pair.DEFAULT_TARGET,
    draft: str = pair.DEFAULT_DRAFT,
    device: str = "cpu",
    dtype: str = "auto",
    limits: DemoLimits | None = None,
    warm_up_first: bool = True,
) -> DemoSession:
    """A ready `DemoSession` (loaded, bound, and warmed up unless told not to); `DemoLoadError` naming the part that
    failed."""
    check_draft_reference(draft)
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise DemoLoadError(f"dspark demo: unknown device {device!r} ({error}).") from None
    try:
        target_model, tokenizer = pair.load_target(target, device, dtype)
    except (OSError, ValueError, ModuleNotFoundError) as error:
        raise DemoLoadError(f"dspark demo: cannot load the target {target!r}: {error}") from None
    try:
        draft_model = pair.load_draft(draft, target_model)
    except (OSError, ValueError) as error:
        raise DemoLoadError(f"dspark demo: cannot load the draft {draft!r} for target {target!r}: {error}") from None
    try:
        session = DemoSession(target_model, tokenizer, draft_model, limits)
    except ValueError as error:
        raise DemoLoadError(str(error)) from None
    if warm_up_first:
        warm_up(session)
    return session


def warm_up(session: DemoSession) -> None:
    """One tiny request through the same path as real ones (same worker threads, same calls)."""
    for _ in session.compare(WARM_UP_TEXT, GenerationSettings(mode=RAW, max_new_tokens=WARM_UP_TOKENS)):
        pass
