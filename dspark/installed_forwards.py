"""Module forwards swapped in for the duration of a step (the static loop's verify step), then put back.

Only the instance attribute changes, so any other call of the model outside the step runs the modules' own code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import nn


@contextlib.contextmanager
def installed_forwards(forwards: dict[nn.Module, Callable]) -> Iterator[None]:
    """Set each module's `forward` to its entry for the duration (re-entrant: an outer installation is restored).

    The forwards should be made once and reused (bound methods kept by the caller): compiled code guards on the
    object it traced through, so a fresh one per call would compile again.
    """
    previous = {module: module.__dict__.get("forward") for module in forwards}
    for module, forward in forwards.items():
        module.forward = forward
    try:
        yield
    finally:
        for module, forward in previous.items():
            if forward is None:
                del module.forward
            else:
                module.forward = forward
