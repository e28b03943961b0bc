"""Turn a callback-driven computation (the loop's `on_round`, a `generate` streamer) into a generator.

The computation runs in a worker thread and hands items over through a queue; the generator yields them in batches
(everything that arrived since the last yield, so a slow consumer never falls behind) and finally returns the
computation's result. An exception in the worker is re-raised in the consumer. When the consumer stops early (a
user closes the page, presses Stop), the next hand-over raises `StreamCancelled` inside the worker, which ends the
computation instead of letting it occupy the machine for nobody.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator
from typing import Any, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class StreamCancelled(Exception):
    """Raised inside the worker when nobody reads its output any more."""


class _Finished:
    def __init__(self, result: Any = None, error: BaseException | None = None):
        self.result = result
        self.error = error


def stream_in_background(
    work: Callable[[Callable[[Item], None]], Result],
) -> Generator[list[Item], None, Result]:
    """Run `work(emit)` in a thread; yield the emitted items in batches; return what `work` returned."""
    handover: queue.Queue = queue.Queue()
    cancelled = threading.Event()

    def emit(item: Item) -> None:
        if cancelled.is_set():
            raise StreamCancelled
        handover.put(item)

    def run() -> None:
        try:
            handover.put(_Finished(result=work(emit)))
        except BaseException as error:  # handed to the consumer, which re-raises it
            handover.put(_Finished(error=error))

    worker = threading.Thread(target=run, name="dspark-demo-worker", daemon=True)
    worker.start()
    try:
        while True:
            batch = [handover.get()]
            while not handover.empty():
                batch.append(handover.get_nowait())
            items = [item for item in batch if not isinstance(item, _Finished)]
            if items:
                yield items
            finished = [item for item in batch if isinstance(item, _Finished)]
            if finished:
                if finished[0].error is not None:
                    raise finished[0].error
                return finished[0].result
    finally:
        cancelled.set()
        # the worker stops at its next hand-over; waiting keeps one request's compute from overlapping the next
        worker.join()
