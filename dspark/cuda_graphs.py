"""Manual CUDA-graph capture of a step that reads and writes only fixed-address buffers.

Batch-1 decoding on a GPU is bound by kernel launches and host work (measured on an H200: a Qwen3-8B-shaped verify
of 9 tokens takes 34.9 ms eager, 10.6 ms replayed from a graph, against a 3.65 ms roofline). A graph records the
kernels of one call once and replays them with a single launch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch


def capture_cuda_graph(
    run: Callable[[], object], reset: Callable[[], None], warmup: int = 2
) -> tuple[torch.cuda.CUDAGraph, object]:
    """Record one call of `run` (after `reset`) into a CUDA graph; the warm-up calls run on a side stream first, as
    PyTorch requires (they trigger lazy allocations, cuBLAS workspace and kernel selection outside the capture).

    Returns the graph and what `run` returned while being recorded: tensors in the graph's private memory that every
    replay rewrites. `run` must not sync with the host; its inputs must live at fixed addresses. `reset` puts inputs
    back so that every warm-up call sees the same state.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(max(warmup, 1)):
            reset()
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    reset()
    with torch.cuda.graph(graph):
        output = run()
    return graph, output


class GraphedStep:
    """A step run eagerly (CPU, or graphs off), or captured on its first call and replayed from then on.

    The first call captures and then replays, so its effect is that of exactly one call of `step`: `step` must be
    idempotent given its input buffers (it recomputes its outputs; state advances happen outside it). If capture
    fails (an op that syncs with the host or is not capturable), the step warns once and stays eager: slower, still
    exact; `failure` keeps the reason.
    """

    def __init__(self, step: Callable[[], object], use_graph: bool, warmup: int = 2, name: str = "step"):
        self.step = step
        self.use_graph = use_graph
        self.warmup = warmup
        self.name = name
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failure: str | None = None

    def __call__(self) -> None:
        if self.use_graph and self.graph is None:
            try:
                self.graph, _ = capture_cuda_graph(self.step, lambda: None, self.warmup)
            except Exception as error:  # any capture failure falls back to the exact eager step
                self.use_graph, self.failure = False, f"{type(error).__name__}: {error}"
                if torch.cuda.is_available():
                    torch.cuda.synchronize()  # let the aborted capture's stream drain before running eagerly
                message = f"dspark: CUDA-graph capture of the {self.name} failed, running it eagerly: {error}"
                warnings.warn(message, stacklevel=2)
        if self.use_graph:
            self.graph.replay()
        else:
            self.step()
