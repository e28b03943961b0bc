"""End-to-end generation throughput, measured so that a speedup can be trusted.

* ABBA order: within each workload (a batch of prompts), round r runs the methods in order on even rounds and in
  reverse on odd rounds (A B, B A, A B, ...), so a slow drift of the machine (clocks, thermals, other tenants) hits
  every method alike; one untimed warm-up run per method and batch size comes first.
* Paired speedups: method m against the baseline (plain decoding) on the cells (workload, round) where both ran;
  speedup = (tokens / seconds of m) / (tokens / seconds of the baseline), with a percentile bootstrap interval that
  resamples workloads (or rounds, when there is a single workload).
* A run that raises is recorded with its error message and never averaged in; methods that only work at batch size 1
  (transformers' assisted generation and prompt lookup) are skipped at larger batches, with a note.
* Outputs are checked: every method's greedy output is compared with the baseline's, row by row.

Tokens are useful tokens: each row's new tokens up to and including its first stop token.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .bootstrap import percentile_interval, resample_indices
from .progress import progress_bar

BATCH_ONE_ONLY_NOTE = "transformers' assisted generation (draft, DFlash, prompt lookup) supports batch size 1 only"


@dataclass
class Workload:
    """One batch of prompts: input_ids and attention_mask [B, P] (left-padded), and the prompts' ids."""

    index: int
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_ids: list[str]

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class GenerationRun:
    """What a method returns: per row its output (useful new tokens, or text from a server), the number of tokens
    generated (None: the total length of the token outputs) and optional numbers (e.g. acceptance counts)."""

    outputs: list
    extras: dict = field(default_factory=dict)
    tokens: int | None = None


@dataclass
class GenerationMethod:
    """A named way to generate a workload greedily; `batch_one_only` methods are skipped at batch sizes > 1.

    The workload is anything with `index` and `batch_size` that `run` understands (a `Workload` of token ids here,
    a wave of prompt texts for a server in `dspark.evaluation.serving`)."""

    name: str
    run: Callable[[Workload], GenerationRun]
    batch_one_only: bool = False
    batch_one_reason: str = BATCH_ONE_ONLY_NOTE


@dataclass
class Measurement:
    """One timed run. error is set (and tokens/seconds are 0) when the run raised."""

    method: str
    batch_size: int
    workload: int
    round: int
    order: int  # position of the run inside its round
    seconds: float = 0.0
    tokens: int = 0
    error: str | None = None
    peak_memory_mib: float | None = None
    extras: dict = field(default_factory=dict)
    outputs: list = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        record = asdict(self)
        record.pop("outputs")
        return record


# ----------------------------------------------------------------------------------------------------------------
# Scheduling and running
# ----------------------------------------------------------------------------------------------------------------


def abba_order(methods: list[str], round_index: int) -> list[str]:
    """The methods of one round: as given on even rounds, reversed on odd ones (A B | B A | A B ...)."""
    return list(methods) if round_index % 2 == 0 else list(reversed(methods))


def abba_schedule(methods: list[str], rounds: int) -> list[tuple[int, str]]:
    """(round, method) for every run of one workload, in execution order."""
    return [(r, name) for r in range(rounds) for name in abba_order(methods, r)]


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_run(method: GenerationMethod, workload: Workload, device: torch.device, clock=time.perf_counter):
    """(GenerationRun or None, seconds, peak memory MiB or None, error message or None)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    started = clock()
    try:
        run = method.run(workload)
        synchronize(device)
    except Exception as error:  # a failed run is recorded, never averaged in
        if device.type == "cuda":
            torch.cuda.empty_cache()  # after an out-of-memory error, let the next run start from a clean allocator
        return None, clock() - started, None, f"{type(error).__name__}: {error}"
    seconds = clock() - started
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return run, seconds, peak, None


def prompt_width(workload) -> int:
    """Padded prompt length of a local workload (0 for a serving wave, whose prompts are text)."""
    input_ids = getattr(workload, "input_ids", None)
    return 0 if input_ids is None else input_ids.shape[1]


def run_abba(
    methods: list[GenerationMethod],
    workloads: list[Workload],
    rounds: int,
    device: torch.device | str = "cpu",
    *,
    warmup: bool = True,
    progress: bool = False,
    clock=time.perf_counter,
) -> list[Measurement]:
    """Run every method on every workload `rounds` times in ABBA order; one Measurement per run.

    Methods that cannot run at a workload's batch size are left out here (see `skipped_methods`).
    """
    device = torch.device(device)
    measurements = []
    bar = progress_bar(len(workloads) * rounds * len(methods), "bench", progress)
    by_name = {method.name: method for method in methods}
    warmed: set[tuple[str, int]] = set()
    # Each batch size warms up on its longest prompt: the static loop then sizes its caches, captures its graphs and
    # compiles its steps once, in the warm-up, rather than again when a longer prompt comes during the timing.
    longest: dict[int, Workload] = {}
    for workload in workloads:
        known = longest.get(workload.batch_size)
        if known is None or prompt_width(workload) > prompt_width(known):
            longest[workload.batch_size] = workload
    for workload in workloads:
        runnable = [m.name for m in methods if not (m.batch_one_only and workload.batch_size > 1)]
        if warmup:
            for name in runnable:
                if (name, workload.batch_size) not in warmed:
                    # untimed: compilation, allocator, caches
                    timed_run(by_name[name], longest[workload.batch_size], device, clock)
                    warmed.add((name, workload.batch_size))
        for order, (round_index, name) in enumerate(abba_schedule(runnable, rounds)):
            run, seconds, peak, error = timed_run(by_name[name], workload, device, clock)
            measurement = Measurement(
                method=name,
                batch_size=workload.batch_size,
                workload=workload.index,
                round=round_index,
                order=order % len(runnable),
                error=error,
            )
            if run is not None:
                measurement.seconds = seconds
                measurement.tokens = run.tokens if run.tokens is not None else sum(len(row) for row in run.outputs)
                measurement.peak_memory_mib = peak
                measurement.extras = run.extras
                measurement.outputs = run.outputs
            measurements.append(measurement)
            bar.update(1)
            if error is None:
                bar.set_postfix_str(
                    f"{name} b{workload.batch_size}: {measurement.tokens / max(seconds, 1e-9):.0f} tok/s"
                )
        bar.update((len(methods) - len(runnable)) * rounds)
    bar.close()
    return measurements


def skipped_methods(methods: list[GenerationMethod], batch_size: int) -> dict[str, str]:
    """Methods that are not run at `batch_size`, with the reason."""
    return {m.name: m.batch_one_reason for m in methods if m.batch_one_only and batch_size > 1}


# ----------------------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------------------


def token_match(candidate: list[Measurement], baseline: list[Measurement]) -> dict | None:
    """Row-by-row comparison of a method's outputs with the baseline's (first successful run of each workload)."""
    first_candidate = {m.workload: m.outputs for m in reversed(candidate) if m.error is None}
    first_baseline = {m.workload: m.outputs for m in reversed(baseline) if m.error is None}
    identical = rows = 0
    prefix_fractions = []
    for workload, expected_rows in first_baseline.items():
        if workload not in first_candidate:
            continue
        for got, expected in zip(first_candidate[workload], expected_rows):
            rows += 1
            identical += got == expected
            common = 0
            for a, b in zip(got, expected):
                if a != b:
                    break
                common += 1
            prefix_fractions.append(common / len(expected) if len(expected) else 1.0)
    if not rows:
        return None
    return {
        "rows": rows,
        "identical": identical,
        "rate": identical / rows,
        "mean_matching_prefix": sum(prefix_fractions) / rows,
    }


def paired_speedup(
    candidate: list[Measurement], baseline: list[Measurement], replicates: int, confidence: float, seed: int
) -> dict | None:
    """Throughput ratio candidate / baseline over the (workload, round) cells where both succeeded, with a
    bootstrap interval over workloads (over rounds when there is one workload)."""
    ours = {(m.workload, m.round): m for m in candidate if m.error is None}
    theirs = {(m.workload, m.round): m for m in baseline if m.error is None}
    cells = sorted(set(ours) & set(theirs))
    if not cells:
        return None
    workloads = sorted({workload for workload, _ in cells})
    by_workload = len(workloads) > 1
    clusters = workloads if by_workload else sorted({r for _, r in cells})
    index = {cluster: i for i, cluster in enumerate(clusters)}
    sums = torch.zeros(4, len(clusters), dtype=torch.float64)  # candidate tokens, seconds; baseline tokens, seconds
    for cell in cells:
        column = index[cell[0] if by_workload else cell[1]]
        sums[:, column] += torch.tensor(
            [ours[cell].tokens, ours[cell].seconds, theirs[cell].tokens, theirs[cell].seconds], dtype=torch.float64
        )

    def ratio(values: torch.Tensor) -> torch.Tensor:
        # values: [4, ..., C] -> [...]
        totals = values.sum(-1)
        return (totals[0] / totals[1].clamp(min=1e-12)) / (totals[2] / totals[3].clamp(min=1e-12)).clamp(min=1e-12)

    estimate = float(ratio(sums))
    interval = None
    if len(clusters) > 1:
        draws = resample_indices(len(clusters), replicates, seed)
        interval = percentile_interval(ratio(sums[:, draws]), confidence)
    return {
        "speedup": estimate,
        "speedup_ci": interval,
        "paired_cells": len(cells),
        "ci_cluster": ("workload" if by_workload else "round") if interval else "none (a single cell)",
    }


def summarize(
    measurements: list[Measurement],
    baseline: str = "plain",
    *,
    replicates: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Per batch size and method: successful and failed runs (with errors), tokens/s, time per output token, peak
    memory, token match and paired speedup against `baseline`. Failed runs count only under `failed_runs`."""
    report = {}
    for batch_size in sorted({m.batch_size for m in measurements}):
        at_size = [m for m in measurements if m.batch_size == batch_size]
        reference = [m for m in at_size if m.method == baseline]
        methods = {}
        for name in dict.fromkeys(m.method for m in at_size):
            runs = [m for m in at_size if m.method == name]
            ok = [m for m in runs if m.error is None]
            tokens, seconds = sum(m.tokens for m in ok), sum(m.seconds for m in ok)
            peaks = [m.peak_memory_mib for m in ok if m.peak_memory_mib is not None]
            entry = {
                "runs": len(ok),
                "failed_runs": len(runs) - len(ok),
                "errors": sorted({m.error for m in runs if m.error is not None}),
                "tokens": tokens,
                "seconds": seconds,
                "tokens_per_second": tokens / seconds if seconds > 0 else None,
                "time_per_output_token_ms": 1000 * seconds / tokens if tokens else None,
                "peak_memory_mib": max(peaks) if peaks else None,
            }
            rounds = sum(m.extras.get("rounds", 0) for m in ok)
            if rounds:
                entry["acceptance_length"] = sum(m.extras.get("emitted_in_rounds", 0) for m in ok) / rounds
            if name != baseline and reference:
                entry["vs_" + baseline] = paired_speedup(runs, reference, replicates, confidence, seed)
                entry["token_match"] = token_match(runs, reference)
            methods[name] = entry
        report[str(batch_size)] = methods
    return report


# ----------------------------------------------------------------------------------------------------------------
# The methods: plain, assisted (draft), our loop, prompt lookup, transformers' DFlash path
# ----------------------------------------------------------------------------------------------------------------


def cut_at_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    """The tokens up to and including the first stop token (what follows it is padding)."""
    return tokens[: next((i + 1 for i, token in enumerate(tokens) if token in stop_ids), len(tokens))]


def useful_tokens(new_tokens: torch.Tensor, stop_ids: set[int]) -> list[list[int]]:
    """[B, T] generated ids -> per row its useful tokens (`cut_at_stop`)."""
    return [cut_at_stop(row, stop_ids) for row in new_tokens.tolist()]


METHOD_NAMES = (
    "plain", "assisted", "loop", "loop_static", "loop_static_compiled", "loop_static_skinny", "lookup", "dflash",
)  # fmt: skip


def generation_methods(
    target,
    draft,
    names: list[str],
    *,
    max_new_tokens: int,
    stop_ids: set[int],
    pad_token_id: int,
    lookup_tokens: int = 10,
) -> list[GenerationMethod]:
    """Greedy generation methods by name: `plain` target.generate; `assisted` target.generate(assistant_model=draft)
    (the draft's Markov head); `loop` dspark's own loop; `loop_static` the same loop on its fixed-shape path
    (static caches, CUDA graphs on a GPU), `loop_static_compiled` with its steps through torch.compile (compiled
    in the warm-up), `loop_static_skinny` that with the verify step's projections and attention through dspark's
    Triton kernels (a bf16/fp16 target on a GPU); `lookup` prompt lookup decoding; `dflash`
    target.generate(assistant_model=draft, speculation_type="dflash")."""
    from ..speculative import speculative_generate

    unknown = [name for name in names if name not in METHOD_NAMES]
    if unknown:
        raise ValueError(f"dspark bench: unknown methods {unknown}; choose from {', '.join(METHOD_NAMES)}.")
    needs_draft = [name for name in names if name not in ("plain", "lookup")]
    if needs_draft and draft is None:
        raise ValueError(f"dspark bench: {', '.join(needs_draft)} need a draft (--draft).")
    common = {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "eos_token_id": sorted(stop_ids),
        "pad_token_id": pad_token_id,
    }

    def through_generate(**extra) -> Callable[[Workload], GenerationRun]:
        def run(workload: Workload) -> GenerationRun:
            out = target.generate(
                input_ids=workload.input_ids, attention_mask=workload.attention_mask, **common, **extra
            )
            return GenerationRun(useful_tokens(out[:, workload.input_ids.shape[1] :], stop_ids))

        return run

    def own_loop(
        static_cache: bool, compile_steps: bool = False, skinny_kernels: bool = False
    ) -> Callable[[Workload], GenerationRun]:
        def run(workload: Workload) -> GenerationRun:
            out = speculative_generate(
                target,
                draft,
                workload.input_ids,
                workload.attention_mask,
                max_new_tokens=max_new_tokens,
                eos_token_id=sorted(stop_ids),
                pad_token_id=pad_token_id,
                return_stats=True,
                static_cache=static_cache,
                compile_steps=compile_steps,
                skinny_kernels=skinny_kernels,
            )
            outputs = [cut_at_stop(row, stop_ids) for row in out.generated]
            lengths = [n for row in out.stats["per_row"] for n in row["acceptance_lengths"]]
            return GenerationRun(outputs, {"rounds": len(lengths), "emitted_in_rounds": sum(lengths)})

        return run

    builders = {
        "plain": lambda: GenerationMethod("plain", through_generate()),
        "assisted": lambda: GenerationMethod("assisted", through_generate(assistant_model=draft), batch_one_only=True),
        "loop": lambda: GenerationMethod("loop", own_loop(static_cache=False)),
        "loop_static": lambda: GenerationMethod("loop_static", own_loop(static_cache=True)),
        "loop_static_compiled": lambda: GenerationMethod(
            "loop_static_compiled", own_loop(static_cache=True, compile_steps=True)
        ),
        "loop_static_skinny": lambda: GenerationMethod(
            "loop_static_skinny", own_loop(static_cache=True, compile_steps=True, skinny_kernels=True)
        ),
        "lookup": lambda: GenerationMethod(
            "lookup", through_generate(prompt_lookup_num_tokens=lookup_tokens), batch_one_only=True
        ),
        "dflash": lambda: GenerationMethod(
            "dflash", through_generate(assistant_model=draft, speculation_type="dflash"), batch_one_only=True
        ),
    }
    return [builders[name]() for name in names]


def prompt_workloads(
    prompts: list[list[int]], prompt_ids: list[str], batch_size: int, pad_token_id: int, device
) -> list[Workload]:
    """Consecutive batches of `batch_size` prompts, left-padded; the last batch is filled by cycling from the first
    prompt, so every workload has exactly `batch_size` rows."""
    count = max(1, -(-len(prompts) // batch_size))
    workloads = []
    for index in range(count):
        chosen = [(index * batch_size + row) % len(prompts) for row in range(batch_size)]
        rows = [prompts[i] for i in chosen]
        width = max(len(row) for row in rows)
        input_ids = torch.tensor([[pad_token_id] * (width - len(row)) + list(row) for row in rows], device=device)
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=device)
        workloads.append(Workload(index, input_ids, mask, [prompt_ids[i] for i in chosen]))
    return workloads


def run_bench(
    target,
    draft,
    prompts: list[list[int]],
    prompt_ids: list[str],
    *,
    methods: list[str],
    batch_sizes: list[int],
    rounds: int,
    max_new_tokens: int,
    stop_ids: set[int],
    pad_token_id: int,
    lookup_tokens: int = 10,
    baseline: str = "plain",
    replicates: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    progress: bool = False,
    on_batch_size: Callable[[dict], None] | None = None,
) -> dict:
    """The whole benchmark: every batch size, ABBA rounds, summary and raw measurements (JSON-ready).

    `on_batch_size` receives the report of the batch sizes done so far after each one (a long benchmark killed by a
    time limit keeps what it measured)."""
    if rounds < 1:
        raise ValueError(f"dspark bench: rounds={rounds} must be >= 1 (2 or more to pair A B with B A).")
    device = next(target.parameters()).device
    chosen = generation_methods(
        target,
        draft,
        methods,
        max_new_tokens=max_new_tokens,
        stop_ids=stop_ids,
        pad_token_id=pad_token_id,
        lookup_tokens=lookup_tokens,
    )
    measurements, skipped = [], {}

    def report() -> dict:
        return {
            "baseline": baseline,
            "summary": summarize(measurements, baseline, replicates=replicates, confidence=confidence, seed=seed),
            "skipped": skipped,
            "measurements": [m.to_dict() for m in measurements],
        }

    for index, batch_size in enumerate(batch_sizes):
        workloads = prompt_workloads(prompts, prompt_ids, batch_size, pad_token_id, device)
        skipped[str(batch_size)] = skipped_methods(chosen, batch_size)
        measurements += run_abba(chosen, workloads, rounds, device, progress=progress)
        if on_batch_size is not None and index < len(batch_sizes) - 1:
            on_batch_size(report())
    return report()
