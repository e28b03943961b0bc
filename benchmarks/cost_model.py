"""Large-shape cost model (issue #3, item 3): what one decode, verify and draft step cost against the HBM roofline.

    python3 benchmarks/cost_model.py --out $OUT                                 # Qwen3-8B shapes, bf16, one GPU
    python3 benchmarks/cost_model.py --preset tiny --device cpu --out /tmp/cost # smoke test, seconds on CPU

A random-weight Qwen3-8B-shaped target is built directly on the device (no checkpoint needed; random weights cost
exactly what trained ones cost). With `--context` tokens prefilled it times, as median and IQR over repeats:
  * decode: one plain decode forward (1 token);
  * verify_q: one verify forward of q tokens that also returns the draft's target features (q = 8, 16 and the
    block's own anchor + drafted tokens);
  * draft_L_layers: one DSpark draft step (backbone forward over the new context + block, Markov sampling of the
    block) for drafts of L layers bound to the target;
  * accept: greedy verification of a block plus the one host read-back a loop needs per round;
  * HF `target.generate` per token (the baseline of the issue's "5x" target).

Each forward step runs in three modes: `eager` (DynamicCache, as HF generate and our loop run today), `static`
(transformers' StaticCache written per row as our static loop does, a precomputed mask and static input buffers, no
graph: isolates the cache) and `graph` (the static step captured in a CUDA graph; manual `torch.cuda.CUDAGraph`
capture first, `torch.compile` "reduce-overhead" as the fallback; which one ran and any failure is recorded, never
raised).

The roofline of a step is the bytes it must read (every weight it multiplies by, plus the KV cache it attends to)
divided by the measured device-to-device copy bandwidth. The report predicts the speedup of a speculative round,
t_round = t_draft + t_verify + t_accept, against tau plain decode steps (and against tau HF generate tokens) at
acceptance lengths tau (tokens emitted per round). Random weights accept nothing, so tau comes from measurements
on real models.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM
from transformers.cache_utils import DynamicCache, StaticCache

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dspark import DSparkDraftModel, cuda_graphs  # noqa: E402
from dspark.evaluation.bench import synchronize  # noqa: E402
from dspark.modeling_dspark import (  # noqa: E402
    ProcessorTokenChooser,
    cache_keyword,
    extract_target_features,
    spread_layer_ids,
)
from dspark.provenance import run_provenance  # noqa: E402
from dspark.static_cache import StaticDraftCache, bucket_length, causal_key_mask, row_static_cache  # noqa: E402
from dspark.verify import verify  # noqa: E402

MODES = ("eager", "static", "graph")
GRAPH_METHODS = {"auto": ("cuda_graph", "torch_compile"), "cuda-graph": ("cuda_graph",), "compile": ("torch_compile",)}


# ----------------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Preset:
    """Target shape and measurement sizes. `qwen3-8b` is the issue's cost model; `tiny` runs on a CPU in seconds.

    architecture "qwen3_5": a hybrid (Gated DeltaNet + attention) Qwen3.5 text model, for the loop benchmarks
    (loop_graphs.py, hybrid_loop.py, verify_profile.py); this script's own steps time attention-only targets."""

    target: dict
    dtype: str
    context: int
    draft_layers: list[int]
    markov_rank: int
    repeats: int
    warmup: int
    generate_tokens: int
    generate_repeats: int
    bandwidth_mib: int
    architecture: str = "qwen3"


PRESETS = {
    "qwen3-8b": Preset(
        target=dict(
            hidden_size=4096,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=12288,
            vocab_size=151936,
        ),
        dtype="bfloat16",
        context=512,
        draft_layers=[1, 5],
        markov_rank=256,  # DeepSpec's rank
        repeats=20,
        warmup=3,
        generate_tokens=64,
        generate_repeats=3,
        bandwidth_mib=2048,
    ),
    "tiny": Preset(
        target=dict(
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=128,
            vocab_size=512,
        ),
        dtype="float32",
        context=32,
        draft_layers=[1, 2],
        markov_rank=8,
        repeats=3,
        warmup=1,
        generate_tokens=4,
        generate_repeats=1,
        bandwidth_mib=16,
    ),
}
# Hybrid targets, measured with the sizes of their attention-only counterparts. qwen3.5-9b: Qwen3_5TextConfig()'s
# defaults (Qwen3.5-9B's text model), 32 layers, a full-attention layer after every three Gated DeltaNet ones.
QWEN35_9B_SHAPE = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=256,
    intermediate_size=12288,
    vocab_size=248320,
    linear_num_key_heads=16,
    linear_num_value_heads=32,
    linear_key_head_dim=128,
    linear_value_head_dim=128,
)
HYBRID_TINY_SHAPE = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=2,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
)
PRESETS["qwen3.5-9b"] = replace(PRESETS["qwen3-8b"], target=QWEN35_9B_SHAPE, architecture="qwen3_5")
PRESETS["tiny-hybrid"] = replace(PRESETS["tiny"], target=HYBRID_TINY_SHAPE, architecture="qwen3_5")
ATTENTION_ONLY_PRESETS = sorted(name for name, preset in PRESETS.items() if preset.architecture == "qwen3")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for cost_model.json")
    parser.add_argument("--preset", choices=ATTENTION_ONLY_PRESETS, default="qwen3-8b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: the preset's")
    parser.add_argument("--context", type=int, help="prefilled tokens before each timed step (default: preset)")
    parser.add_argument("--block-size", type=int, default=8, help="draft block (DSpark: all slots draft)")
    parser.add_argument("--verify-lengths", type=int, nargs="+", default=[8, 16], help="plus block_size + 1")
    parser.add_argument("--draft-layers", type=int, nargs="+", help="draft depths to time (default: preset)")
    parser.add_argument("--markov-rank", type=int, help="default: preset")
    parser.add_argument("--repeats", type=int, help="timed calls per step and mode (default: preset)")
    parser.add_argument("--warmup", type=int, help="untimed calls before timing (default: preset)")
    parser.add_argument("--generate-tokens", type=int, help="new tokens per HF generate call (default: preset)")
    parser.add_argument("--generate-repeats", type=int, help="default: preset")
    parser.add_argument("--bandwidth-mib", type=int, help="size of the copied buffer (default: preset)")
    parser.add_argument("--graph-method", choices=[*GRAPH_METHODS, "none"], default="auto")
    parser.add_argument("--compile-budget-s", type=float, default=60.0, help="stop trying torch.compile after this")
    parser.add_argument("--taus", type=float, nargs="+", default=[1.4, 2.0, 3.0, 4.0, 5.0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    for name in vars(preset):
        if name not in ("target", "architecture") and getattr(args, name) is None:
            setattr(args, name, getattr(preset, name))
    if args.generate_tokens < 2:
        parser.error("--generate-tokens must be >= 2 (the per-token cost is the difference to a 1-token call)")
    args.verify_lengths = sorted({*args.verify_lengths, args.block_size + 1})
    return args


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------


def time_calls(
    run: Callable[[], object], reset: Callable[[], None], device: torch.device, warmup: int, repeats: int
) -> list[float]:
    """Milliseconds per call of `run`, each started on an idle device and ended when its work is done.

    Batch-1 decoding is a sequence of such calls, so launch overhead and host syncs count, as they do for a user.
    `reset` runs before every call, untimed, so every call sees the same cache state.
    """
    for _ in range(warmup):
        reset()
        run()
    samples = []
    for _ in range(repeats):
        reset()
        synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            tick = time.perf_counter()
            run()
            samples.append((time.perf_counter() - tick) * 1e3)
    return samples


def summarize(samples: list[float], roofline_ms: float | None = None) -> dict:
    """Median, quartiles and IQR of timings in ms (and the median's multiple of the roofline, when given)."""
    q1, median, q3 = torch.quantile(
        torch.tensor(samples, dtype=torch.float64), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    )
    summary = {
        "median_ms": float(median),
        "q1_ms": float(q1),
        "q3_ms": float(q3),
        "iqr_ms": float(q3 - q1),
        "min_ms": min(samples),
        "max_ms": max(samples),
        "repeats": len(samples),
    }
    if roofline_ms:
        summary["roofline_ratio"] = summary["median_ms"] / roofline_ms
    return summary


def no_reset() -> None:
    pass


# ----------------------------------------------------------------------------------------------------------------
# Bandwidth and bytes
# ----------------------------------------------------------------------------------------------------------------


def kernel_dtype(device: torch.device) -> torch.dtype:
    """The dtype our Triton kernels are benchmarked in: bf16 on a GPU; float16 on a CPU, where they run under Triton's
    interpreter, whose bf16 matrix product is broken."""
    return torch.bfloat16 if device.type == "cuda" else torch.float16


def graph_microseconds(run, device: torch.device, repeats: int, per: int) -> float:
    """Median microseconds of one call of `run`, divided by `per`: replayed from a CUDA graph on a GPU (after one eager
    call, which compiles, and fails here rather than inside the capture), timed directly on a CPU."""
    run()
    if device.type != "cuda":
        started = time.perf_counter()
        run()
        return 1e6 * (time.perf_counter() - started) / per
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    samples = []
    for _ in range(repeats + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(1e3 * start.elapsed_time(end) / per)
    return statistics.median(samples[2:])


def copy_bandwidth(device: torch.device, mib: int, warmup: int, repeats: int) -> dict:
    """Device-to-device copy of `mib` MiB: GB/s counting the bytes read plus the bytes written (1 GB = 1e9 B)."""
    source = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    destination = torch.empty_like(source)
    samples = time_calls(lambda: destination.copy_(source), no_reset, device, warmup, repeats)
    moved = 2 * source.nbytes
    rates = sorted(moved / (ms * 1e-3) / 1e9 for ms in samples)
    return {"gb_per_s": rates[len(rates) // 2], "samples_gb_per_s": rates, "bytes_per_copy": moved}


def kv_bytes(config, layers: int, tokens: int, dtype: torch.dtype) -> int:
    """Keys + values of `tokens` positions over `layers` attention layers."""
    return layers * 2 * config.num_key_value_heads * config.head_dim * tokens * dtype.itemsize


def layer_counts(config) -> tuple[int, int]:
    """(attention layers, Gated DeltaNet layers) of a target's text config."""
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    linear = sum(kind == "linear_attention" for kind in kinds)
    return len(kinds) - linear, linear


def linear_state_bytes(config, layers: int) -> int:
    """One row's float32 recurrent states over `layers` Gated DeltaNet layers (a forward reads them once)."""
    if not layers:
        return 0
    per_layer = config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim * 4
    return layers * per_layer


def target_weight_bytes(target: Qwen3ForCausalLM) -> dict:
    """All weight bytes, and those one forward reads (the input embedding is a row lookup, so it is left out)."""
    total = sum(p.nbytes for p in target.parameters())
    embedding = target.get_input_embeddings().weight
    tied = target.get_output_embeddings().weight is embedding
    return {"total": total, "read_per_forward": total if tied else total - embedding.nbytes}


def draft_bytes_per_step(draft: DSparkDraftModel, kv_tokens: int) -> int:
    """Bytes one draft step reads: its layers and fc, the borrowed lm_head, W2 once per slot (the Markov head runs
    slot by slot; W1 and the embedding are row lookups) and the draft KV cache."""
    config = draft.config
    weights = sum(p.nbytes for p in draft.parameters()) + draft.output_head().weight.nbytes
    if draft.markov_head is not None:
        weights -= draft.markov_head.markov_w1.weight.nbytes
        weights += (config.num_draft_tokens - 1) * draft.markov_head.markov_w2.weight.nbytes
    return weights + kv_bytes(config, config.num_hidden_layers, kv_tokens, draft.dtype)


def roofline_ms(num_bytes: int, bandwidth: dict) -> float:
    return num_bytes / (bandwidth["gb_per_s"] * 1e9) * 1e3


def forward_roofline(target, cache_len: int, device: torch.device) -> dict | None:
    """The least time one target forward can take on a GPU: the bytes it must read (weights + a KV cache of
    `cache_len` entries) over measured copy bandwidth. None off CUDA."""
    if device.type != "cuda":
        return None
    bandwidth = copy_bandwidth(device, 2048, 3, 20)
    config = target.config.get_text_config()
    weights = target_weight_bytes(target)["read_per_forward"]
    attention, linear = layer_counts(config)
    state = kv_bytes(config, attention, cache_len, target.dtype) + linear_state_bytes(config, linear)
    return {"bandwidth_gb_per_s": bandwidth["gb_per_s"], "roofline_ms": roofline_ms(weights + state, bandwidth)}


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def build_target(shape: dict, device: torch.device, dtype: torch.dtype, architecture: str = "qwen3"):
    """A random-weight Qwen3 (or, architecture "qwen3_5", hybrid Qwen3.5 text model) created directly on `device` in
    `dtype` (seconds even for 8B: no CPU copy, no fp32)."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    config_class, model_class = {
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
        "qwen3_5": (Qwen3_5TextConfig, Qwen3_5ForCausalLM),
    }[architecture]
    config = config_class(
        **shape,
        max_position_embeddings=40960,
        tie_word_embeddings=False,
        initializer_range=0.02,  # small normal weights keep 36 random layers finite in bf16
        bos_token_id=None,
        eos_token_id=None,  # random weights must not stop generate early
        pad_token_id=None,
    )
    with torch.device(device):
        target = model_class._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return target.eval()


def build_draft(target: Qwen3ForCausalLM, layers: int, block_size: int, markov_rank: int) -> DSparkDraftModel:
    """A random DSpark draft of the target's width (Markov head + confidence head), bound to it, on its device."""
    with torch.device(target.device):
        draft = DSparkDraftModel.from_target(
            target,
            num_hidden_layers=layers,
            block_size=block_size,
            markov_rank=markov_rank,
            enable_confidence_head=True,
            confidence_head_with_markov=markov_rank > 0,
        ).eval()
    if draft.markov_head is not None:
        # A fresh W2 is zero (a no-op head); a trained one is not. Same cost, but the checks then see the Markov path.
        torch.nn.init.normal_(draft.markov_head.markov_w2.weight, std=0.02)
    return draft


def build_draft_layer_ids(target) -> list[int]:
    """The target layers a default draft reads (`from_target` spreads 5 over the depth)."""
    return spread_layer_ids(target.config.num_hidden_layers, 5)


def padded_length(length: int) -> int:
    """Cache lengths rounded up to 16 entries: memory-efficient SDPA wants mask rows aligned, else it pads a copy."""
    return bucket_length(length, 16)


# ----------------------------------------------------------------------------------------------------------------
# Caches and masks
# ----------------------------------------------------------------------------------------------------------------


def rewind_dynamic(cache: DynamicCache, length: int) -> None:
    """Drop entries past `length` (the timed step appended them)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def visible_keys(count: int, queries: int, max_len: int, device: torch.device) -> torch.Tensor:
    """[1, 1, queries, max_len] bool: every block query sees the first `count` draft cache entries (the block attends
    bidirectionally, the context strictly precedes it). Materialised, not broadcast, for the SDPA kernels."""
    return (torch.arange(max_len, device=device) < count).expand(1, 1, queries, max_len).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Steps: one callable per timed unit, plus how to rewind its cache before every call
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Step:
    """run() returns the step's main output (logits, or the draft's q logits) for the consistency checks."""

    run: Callable[[], torch.Tensor]
    reset: Callable[[], None]


@dataclass
class TargetContext:
    """The prompt prefilled into both cache kinds, and the features the draft reads from it."""

    prompt: torch.Tensor  # [1, P]
    dynamic: DynamicCache
    static: StaticCache
    write_start: torch.Tensor  # [1] where the static cache writes next (the loop's per-row write index)
    max_len: int
    features: torch.Tensor  # [1, P, K * H] target features of the prompt (for the draft's context)


def prefill_target(target, prompt: torch.Tensor, max_len: int, layer_ids: list[int]) -> TargetContext:
    """Run the prompt into a DynamicCache (eager path) and a StaticCache (static and graph paths)."""
    length = prompt.shape[1]
    keyword = cache_keyword(target)
    positions = torch.arange(length, device=prompt.device)[None]
    dynamic = DynamicCache(config=target.config)
    out = target(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        position_ids=positions,
        **{keyword: dynamic},
        use_cache=True,
        output_hidden_states=True,
    )
    write_start = torch.zeros(1, dtype=torch.long, device=prompt.device)
    static = row_static_cache(target.config, max_len, write_start)  # the static loop's target cache
    mask = causal_key_mask(write_start, torch.zeros_like(write_start), length, max_len)
    target(input_ids=prompt, position_ids=positions, attention_mask={"full_attention": mask}, **{keyword: static})
    features = extract_target_features(out.hidden_states, layer_ids)
    return TargetContext(prompt, dynamic, static, write_start, max_len, features)


def target_steps(target, context: TargetContext, tokens: torch.Tensor, layer_ids: list[int] | None) -> dict:
    """Eager and static steps of one target forward over `tokens` [1, q] after the prompt.

    With `layer_ids` (a verify step) the forward also returns hidden states and gathers the draft's features, as the
    loop's verify does; without (a plain decode step) it returns logits only.
    """
    start, length = context.prompt.shape[1], tokens.shape[1]
    keyword = cache_keyword(target)
    positions = torch.arange(start, start + length, device=tokens.device)[None]
    key_mask = torch.ones(1, start + length, dtype=torch.long, device=tokens.device)
    first = torch.zeros(1, dtype=torch.long, device=tokens.device)
    mask = {"full_attention": causal_key_mask(first + start, first, length, context.max_len)}
    want_features = layer_ids is not None

    def forward(cache, attention_mask) -> torch.Tensor:
        out = target(
            input_ids=tokens,
            attention_mask=attention_mask,
            position_ids=positions,
            **{keyword: cache},
            use_cache=True,
            output_hidden_states=want_features,
        )
        if want_features:
            extract_target_features(out.hidden_states, layer_ids)
        return out.logits

    return {
        "eager": Step(lambda: forward(context.dynamic, key_mask), lambda: rewind_dynamic(context.dynamic, start)),
        "static": Step(lambda: forward(context.static, mask), lambda: context.write_start.fill_(start)),
    }


@dataclass
class DraftContext:
    """A draft whose caches hold the prompt's context, plus the inputs of one round's draft step."""

    anchor: torch.Tensor  # [1]
    new_context: torch.Tensor  # [1, C, K * H] features of the last verify block
    start: int  # context positions already in the draft caches
    dynamic: DynamicCache
    static: StaticDraftCache
    max_len: int


def prefill_draft(draft: DSparkDraftModel, features: torch.Tensor, new_context: torch.Tensor) -> DraftContext:
    """Put the prompt's features into an eager (DynamicCache) and a static draft cache, as a first round would."""
    start, slots = features.shape[1], draft.config.block_size
    max_len = padded_length(start + new_context.shape[1] + slots)
    device = features.device
    anchor = torch.zeros(1, dtype=torch.long, device=device)
    positions = torch.arange(start + slots, device=device)[None]
    dynamic = DynamicCache()
    draft(draft.embed_block(anchor), features, position_ids=positions, cache=dynamic)
    dynamic.crop(-slots)
    static = StaticDraftCache(draft.config, max_len, draft.dtype, device)
    mask = visible_keys(start + slots, slots, max_len, device)
    draft(draft.embed_block(anchor), features, position_ids=positions, attention_mask=mask, cache=static)
    return DraftContext(anchor, new_context, start, dynamic, static, max_len)


def draft_steps(draft: DSparkDraftModel, context: DraftContext) -> dict:
    """Eager and static draft steps: backbone over [new context ; block], then Markov sampling of the block (greedy).

    The eager step is the loop's `draft_round`: a 2-D key mask and a DynamicCache cropped after the forward. The static
    step writes into fixed buffers under a precomputed 4-D mask, so it has no host sync and can be captured.
    """
    start, slots, fresh = context.start, draft.config.block_size, context.new_context.shape[1]
    device = context.anchor.device
    positions = torch.arange(start, start + fresh + slots, device=device)[None]
    key_mask = torch.ones(1, start + fresh + slots, dtype=torch.long, device=device)
    mask = visible_keys(start + fresh + slots, slots, context.max_len, device)

    def step(cache, attention_mask, crop: bool) -> torch.Tensor:
        out = draft(
            draft.embed_block(context.anchor),
            context.new_context,
            position_ids=positions,
            attention_mask=attention_mask,
            cache=cache,
        )
        if crop:
            cache.crop(-slots)
        chooser = ProcessorTokenChooser(context.anchor[:, None], None, do_sample=False)
        return draft.draft_block(out.draft_hidden_states, context.anchor, chooser).q_logits

    return {
        "eager": Step(
            lambda: step(context.dynamic, key_mask, crop=True), lambda: rewind_dynamic(context.dynamic, start)
        ),
        "static": Step(lambda: step(context.static, mask, crop=False), lambda: context.static.position.fill_(start)),
    }


def accept_step(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> Step:
    """Greedy verification of one block and the single host read-back a loop needs per round (how far rows moved)."""
    lengths = torch.full((draft_tokens.shape[0],), draft_tokens.shape[1], device=draft_tokens.device)

    def run() -> torch.Tensor:
        verdict = verify(draft_tokens, lengths, None, target_logits.float(), do_sample=False)
        torch.stack([verdict.accepted, verdict.next_tokens]).tolist()
        return verdict.accepted

    return Step(run, no_reset)


# ----------------------------------------------------------------------------------------------------------------
# Graph capture
# ----------------------------------------------------------------------------------------------------------------


def capture_cuda_graph(step: Step, warmup: int) -> Callable[[], torch.Tensor]:
    """Manual capture (`dspark.cuda_graphs`); each replay rewrites the output tensor recorded at capture."""
    graph, output = cuda_graphs.capture_cuda_graph(step.run, step.reset, max(warmup, 2))
    # the recorded kernels read the cache position from device memory at replay time, so `reset` still works

    def replay() -> torch.Tensor:
        graph.replay()
        return output

    return replay


def capture_torch_compile(step: Step, warmup: int) -> Callable[[], torch.Tensor]:
    """torch.compile "reduce-overhead": CUDA graphs through inductor (slower to build; the fallback)."""
    compiled = torch.compile(step.run, mode="reduce-overhead", dynamic=False)

    def replay() -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return compiled()

    for _ in range(max(warmup, 3)):  # compile, then record the graph
        step.reset()
        replay()
    return replay


CAPTURERS = {"cuda_graph": capture_cuda_graph, "torch_compile": capture_torch_compile}


def graph_step(step: Step, args: argparse.Namespace, graphs: dict) -> tuple[Step | None, str | None, list[str]]:
    """Capture the static step with the first method that works; failures are returned as text, not raised.

    torch.compile costs tens of seconds per shape on an 8B model, so it stops being tried once `--compile-budget-s`
    is spent (the run must fit one device call).
    """
    failures = []
    for name in GRAPH_METHODS[args.graph_method]:
        if name == "torch_compile" and graphs["compile_seconds"] > args.compile_budget_s:
            failures.append(f"{name}: skipped, {graphs['compile_seconds']:.0f} s of compile budget spent")
            continue
        started = time.perf_counter()
        try:
            replay = CAPTURERS[name](step, args.warmup)
        except Exception as error:  # a failed capture is a result to report, not a crash
            failures.append(f"{name}: {type(error).__name__}: {str(error)[:400]}")
            replay = None
        seconds = time.perf_counter() - started
        if name == "torch_compile":
            graphs["compile_seconds"] += seconds
        if replay is not None:
            print(f"  captured with {name} in {seconds:.1f} s", flush=True)
            return Step(replay, step.reset), name, failures
    return None, None, failures


# ----------------------------------------------------------------------------------------------------------------
# Measuring one step in every mode
# ----------------------------------------------------------------------------------------------------------------


def fresh_output(step: Step) -> torch.Tensor:
    step.reset()
    return step.run().detach().float().clone()


def agreement(reference: torch.Tensor, other: torch.Tensor) -> dict:
    """How far two runs of the same step are apart: max |difference| and argmax agreement over positions."""
    return {
        "max_abs_diff": float((reference - other).abs().max()),
        "argmax_agreement": float((reference.argmax(-1) == other.argmax(-1)).float().mean()),
    }


def measure(steps: dict, roofline: float | None, args: argparse.Namespace, graphs: dict) -> dict:
    """Time a step eager, static and (if allowed) graph-captured; check the modes compute the same thing."""
    device = torch.device(args.device)
    entry = {"roofline_ms": roofline, "graph_method": None, "graph_failures": [], "checks": {}}
    outputs = {}
    for mode in ("eager", "static"):
        outputs[mode] = fresh_output(steps[mode])
        entry[mode] = summarize(
            time_calls(steps[mode].run, steps[mode].reset, device, args.warmup, args.repeats), roofline
        )
    entry["checks"]["static_vs_eager"] = agreement(outputs["eager"], outputs["static"])
    entry["checks"]["finite"] = bool(torch.isfinite(outputs["eager"]).all())
    entry["graph"] = None
    if graphs["skipped_reason"] is not None:
        return entry
    try:
        captured, method, failures = graph_step(steps["static"], args, graphs)
        entry["graph_method"], entry["graph_failures"] = method, failures
        if captured is not None:
            graphs["methods_used"] = sorted({*graphs["methods_used"], method})
            entry["checks"]["graph_vs_static"] = agreement(outputs["static"], fresh_output(captured))
            entry["graph"] = summarize(
                time_calls(captured.run, captured.reset, device, args.warmup, args.repeats), roofline
            )
    except Exception as error:  # e.g. a replay that fails after a capture that seemed to work
        entry["graph_failures"].append(f"replay: {type(error).__name__}: {str(error)[:400]}")
    return entry


def describe(name: str, entry: dict) -> str:
    cells = [f"{name:<16}", f"{entry['roofline_ms']:>9.3f}" if entry["roofline_ms"] else f"{'-':>9}"]
    for mode in MODES:
        timing = entry.get(mode)
        if timing is None:
            cells.append(f"{'-':>25}")
        else:
            ratio = f"{timing['roofline_ratio']:.1f}x" if "roofline_ratio" in timing else ""
            cells.append(f"{timing['median_ms']:>9.3f} ({timing['iqr_ms']:6.3f}) {ratio:>6}")
    return " ".join(cells)


# ----------------------------------------------------------------------------------------------------------------
# HF generate baseline and predictions
# ----------------------------------------------------------------------------------------------------------------


def generate_cost(target, prompt: torch.Tensor, args: argparse.Namespace) -> dict:
    """HF `generate` (greedy, DynamicCache, eager): ms per token, with and without the prefill.

    `marginal_per_token_ms` = (t(n tokens) - t(1 token)) / (n - 1) removes the prefill; `per_token_ms` = t(n) / n.
    """
    device = torch.device(args.device)
    mask = torch.ones_like(prompt)
    produced = []

    def call(tokens: int) -> Callable[[], None]:
        def run() -> None:
            out = target.generate(
                input_ids=prompt, attention_mask=mask, max_new_tokens=tokens, do_sample=False, pad_token_id=0
            )
            produced.append(out.shape[1] - prompt.shape[1])

        return run

    first = summarize(time_calls(call(1), no_reset, device, 1, args.generate_repeats))  # its warm-up serves both
    full = summarize(time_calls(call(args.generate_tokens), no_reset, device, 0, args.generate_repeats))
    return {
        "new_tokens": min(produced[-args.generate_repeats :]),
        "total": full,
        "one_token": first,
        "per_token_ms": full["median_ms"] / args.generate_tokens,
        "marginal_per_token_ms": (full["median_ms"] - first["median_ms"]) / (args.generate_tokens - 1),
    }


def predictions(report: dict, args: argparse.Namespace) -> list[dict]:
    """Speedup of a speculative round over tau plain steps, per mode and draft depth, at each tau.

    t_round = t_draft + t_verify(block + 1 tokens) + t_accept; speedup_vs_decode = tau * t_decode / t_round (same mode);
    speedup_vs_generate = tau * (HF generate ms per token) / t_round.
    """
    steps = report["steps"]
    accept = steps["accept"]["eager"]["median_ms"]
    generate = report.get("generate", {}).get("marginal_per_token_ms")
    rows = []
    for mode in MODES:
        decode = steps["decode"].get(mode)
        verify_timing = steps[f"verify_{args.block_size + 1}"].get(mode)
        for layers in args.draft_layers:
            draft_timing = steps.get(f"draft_{layers}_layers", {}).get(mode)
            if decode is None or verify_timing is None or draft_timing is None:
                continue
            t_round = draft_timing["median_ms"] + verify_timing["median_ms"] + accept
            for tau in args.taus:
                rows.append(
                    {
                        "mode": mode,
                        "draft_layers": layers,
                        "tau": tau,
                        "t_draft_ms": draft_timing["median_ms"],
                        "t_verify_ms": verify_timing["median_ms"],
                        "t_accept_ms": accept,
                        "t_round_ms": t_round,
                        "ms_per_token": t_round / tau,
                        "speedup_vs_decode": tau * decode["median_ms"] / t_round,
                        "speedup_vs_generate": tau * generate / t_round if generate else None,
                    }
                )
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Report:
    provenance: dict
    settings: dict
    graphs: dict
    shapes: dict = field(default_factory=dict)
    bandwidth: dict = field(default_factory=dict)
    roofline: dict = field(default_factory=dict)
    steps: dict = field(default_factory=dict)
    generate: dict = field(default_factory=dict)
    ratios: dict = field(default_factory=dict)
    predictions: list = field(default_factory=list)
    errors: dict = field(default_factory=dict)
    wall_seconds: float | None = None  # from the bandwidth test to the end (imports and CUDA start-up not included)


def save(report: Report, out: Path) -> Path:
    """Written after every section, so a run cut short still leaves what it measured."""
    path = out / "cost_model.json"
    path.write_text(json.dumps(asdict(report), indent=1))
    return path


def graph_skip_reason(args: argparse.Namespace) -> str | None:
    if args.graph_method == "none":
        return "--graph-method none"
    if torch.device(args.device).type != "cuda":
        return f"CUDA graphs need a CUDA device (ran on {args.device})"
    return None


def measure_target(target, report: Report, args: argparse.Namespace, out: Path) -> TargetContext:
    """Decode and verify steps; returns the prefilled context for the draft steps."""
    device = torch.device(args.device)
    layer_ids = build_draft_layer_ids(target)
    prompt = torch.randint(0, target.config.vocab_size, (1, args.context), device=device)
    max_len = padded_length(args.context + max(args.verify_lengths))
    context = prefill_target(target, prompt, max_len, layer_ids)
    weights = report.roofline["target_weight_bytes"]["read_per_forward"]
    for length in [1, *args.verify_lengths]:
        name = "decode" if length == 1 else f"verify_{length}"
        tokens = torch.randint(0, target.config.vocab_size, (1, length), device=device)
        roofline = roofline_ms(
            weights + kv_bytes(target.config, target.config.num_hidden_layers, args.context + length, target.dtype),
            report.bandwidth,
        )
        print(f"{name}: roofline {roofline:.3f} ms", flush=True)
        try:
            steps = target_steps(target, context, tokens, None if length == 1 else layer_ids)
            report.steps[name] = {"q_len": length, **measure(steps, roofline, args, report.graphs)}
        except Exception as error:
            report.errors[name] = f"{type(error).__name__}: {error}"
        save(report, out)
    return context


def measure_drafts(target, context: TargetContext, report: Report, args: argparse.Namespace, out: Path) -> None:
    """Draft steps for each depth, plus the accept step (it needs a drafted block and verify logits)."""
    device = torch.device(args.device)
    verify_tokens = args.block_size + 1
    # The draft's new context each round is the features of the verify block (anchor + drafted tokens).
    verify_input = torch.randint(0, target.config.vocab_size, (1, verify_tokens), device=device)
    keyword = cache_keyword(target)
    out_verify = target(
        input_ids=verify_input,
        position_ids=torch.arange(args.context, args.context + verify_tokens, device=device)[None],
        **{keyword: context.dynamic},
        use_cache=True,
        output_hidden_states=True,
    )
    rewind_dynamic(context.dynamic, args.context)
    new_context = extract_target_features(out_verify.hidden_states, build_draft_layer_ids(target))
    drafted = None
    for layers in args.draft_layers:
        name = f"draft_{layers}_layers"
        try:
            draft = build_draft(target, layers, args.block_size, args.markov_rank)
            report.shapes[name] = {
                "parameters": sum(p.numel() for p in draft.parameters()),
                "markov_rank": args.markov_rank,
                "block_size": args.block_size,
                "target_layer_ids": draft.config.target_layer_ids,
            }
            draft_context = prefill_draft(draft, context.features, new_context)
            kv_tokens = args.context + new_context.shape[1] + args.block_size
            roofline = roofline_ms(draft_bytes_per_step(draft, kv_tokens), report.bandwidth)
            print(f"{name}: roofline {roofline:.3f} ms", flush=True)
            steps = draft_steps(draft, draft_context)
            report.steps[name] = {"layers": layers, **measure(steps, roofline, args, report.graphs)}
            if drafted is None:
                drafted = fresh_output(steps["eager"]).argmax(-1)
            del draft, draft_context, steps
        except Exception as error:
            report.errors[name] = f"{type(error).__name__}: {error}"
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save(report, out)
    if drafted is not None:
        accept = accept_step(drafted, out_verify.logits)
        timing = time_calls(accept.run, accept.reset, device, args.warmup, args.repeats)
        report.steps["accept"] = {"roofline_ms": None, "eager": summarize(timing)}
        save(report, out)


def summarize_ratios(report: Report) -> dict:
    """HF generate's ms per token over one decode step in each mode (the issue asks >= 5 for the graph mode)."""
    ratios = {}
    decode = report.steps.get("decode", {})
    generate = report.generate.get("marginal_per_token_ms")
    for mode in MODES:
        if decode.get(mode) and generate:
            ratios[f"generate_token_over_{mode}_decode"] = generate / decode[mode]["median_ms"]
    return ratios


def print_tables(report: Report) -> None:
    print(
        f"\ncopy bandwidth {report.bandwidth['gb_per_s']:.0f} GB/s; target weights read per forward "
        f"{report.roofline['target_weight_bytes']['read_per_forward'] / 1e9:.2f} GB"
    )
    header = f"{'step':<16} {'roof ms':>9} " + " ".join(f"{mode + ' ms (IQR) xroof':>25}" for mode in MODES)
    print(header)
    for name, entry in report.steps.items():
        print(describe(name, entry))
    if report.generate:
        print(
            f"HF generate: {report.generate['marginal_per_token_ms']:.3f} ms/token marginal, "
            f"{report.generate['per_token_ms']:.3f} ms/token with prefill ({report.generate['new_tokens']} tokens)"
        )
    for name, value in report.ratios.items():
        print(f"{name}: {value:.2f}")
    if report.predictions:
        print(f"\n{'mode':<7} {'layers':>6} {'tau':>5} {'round ms':>9} {'ms/token':>9} {'vs decode':>10} {'vs HF':>7}")
        for row in report.predictions:
            versus = f"{row['speedup_vs_generate']:.2f}" if row["speedup_vs_generate"] else "-"
            print(
                f"{row['mode']:<7} {row['draft_layers']:>6} {row['tau']:>5.1f} {row['t_round_ms']:>9.3f} "
                f"{row['ms_per_token']:>9.3f} {row['speedup_vs_decode']:>10.2f} {versus:>7}"
            )
    for name, error in report.errors.items():
        print(f"ERROR {name}: {error}")


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    report = Report(
        provenance=run_provenance(device),
        settings={key: value for key, value in vars(args).items() if key != "out"},
        graphs={
            "requested": args.graph_method,
            "skipped_reason": graph_skip_reason(args),
            "methods_used": [],
            "compile_seconds": 0.0,
        },
    )
    started = time.perf_counter()
    report.bandwidth = copy_bandwidth(device, args.bandwidth_mib, args.warmup, max(args.repeats, 5))
    built = time.perf_counter()
    target = build_target(PRESETS[args.preset].target, device, dtype)
    report.shapes["target"] = {
        **PRESETS[args.preset].target,
        "parameters": sum(p.numel() for p in target.parameters()),
        "build_seconds": time.perf_counter() - built,
    }
    weights = target_weight_bytes(target)
    report.roofline = {
        "target_weight_bytes": weights,
        "decode_all_weights_ms": roofline_ms(weights["total"], report.bandwidth),
        "decode_weights_read_ms": roofline_ms(weights["read_per_forward"], report.bandwidth),
    }
    save(report, out)
    context = measure_target(target, report, args, out)
    print("HF generate", flush=True)
    try:  # before the drafts: the baseline matters most if a run is cut short
        report.generate = generate_cost(target, context.prompt, args)
    except Exception as error:
        report.errors["generate"] = f"{type(error).__name__}: {error}"
    save(report, out)
    measure_drafts(target, context, report, args, out)
    report.wall_seconds = time.perf_counter() - started
    report.ratios = summarize_ratios(report)
    if "decode" in report.steps and f"verify_{args.block_size + 1}" in report.steps and "accept" in report.steps:
        report.predictions = predictions(asdict(report), args)
    path = save(report, out)
    print_tables(report)
    print(f"\nwrote {path}")
    return asdict(report)


if __name__ == "__main__":
    main()
