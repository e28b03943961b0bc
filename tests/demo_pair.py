"""The demo session both demo test modules use: the embedded default pair, loaded once per pytest run (loading the
real target is the slow part), with small limits so that every request stays short."""

from __future__ import annotations

import functools

from dspark.demo.handlers import DemoLimits, DemoSession
from dspark.demo.models import load_session

LIMITS = DemoLimits(max_prompt_tokens=48, max_new_tokens=12)


def have_smollm2() -> bool:
    from dspark.targets import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError:
        return False
    return True


@functools.cache
def shared_session() -> DemoSession:
    # no warm-up: the tests check behaviour, not speed
    return load_session(dtype="float32", limits=LIMITS, warm_up_first=False)
