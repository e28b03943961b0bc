"""`dspark generate "prompt"`: stream a speculative answer, then compare with plain decoding in the same run.

With no model arguments it runs the embedded default pair (SmolLM2-135M-Instruct + its shipped DSpark draft) on the
CPU, offline. The speculative answer streams as rounds are verified; then plain `target.generate` produces the same
answer (identical at temperature 0) and both are timed, so the reported speedup is measured, not assumed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from . import pair
from .evaluation.bench import synchronize

COMMAND = "generate"
HELP = "generate with the draft (streamed) and report acceptance length, tokens/s and speedup vs plain decoding"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the user message (chat mode) or raw text (--raw)")
    parser.add_argument("--target", default=pair.DEFAULT_TARGET, help="smollm2 (default) or a HF model path")
    parser.add_argument("--draft", default=pair.DEFAULT_DRAFT, help="default (the embedded draft) or a draft path")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", action="store_true", help="no chat template: continue the text as given")
    parser.add_argument(
        "--method",
        choices=["auto", "loop", "loop_static", "assisted"],
        default="auto",
        help="auto (default): loop_static for a target on a GPU that it supports (or with --compile), else loop; "
        "loop: dspark's own loop (any target); loop_static: its fixed-shape path (static caches, CUDA graphs on a "
        "GPU; attention-only and Qwen3.5/3.6 hybrid targets); assisted: target.generate(assistant_model=draft)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="with --method loop_static: run its draft and verify steps through torch.compile (compiled in the "
        "warm-up, tens of seconds)",
    )
    parser.add_argument(
        "--skinny-kernels",
        action="store_true",
        help="with --method loop_static on a GPU: the verify step's projections and attention through dspark's "
        "Triton kernels instead of cuBLAS and SDPA (bf16/fp16 targets)",
    )
    parser.add_argument("--no-compare", action="store_true", help="skip the plain-decoding comparison")
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON at the end")


def prompt_ids(tokenizer, prompt: str, raw: bool, device) -> torch.Tensor:
    """[1, P] ids: the chat template with the generation prompt, or the raw text."""
    if tokenizer is None:
        raise ValueError("dspark generate: the target has no tokenizer; give a target path that ships one.")
    if raw or tokenizer.chat_template is None:
        return tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    from .targets import chat_prompt

    return chat_prompt(tokenizer, prompt).to(device)


class TextStream:
    """Prints decoded text as tokens arrive, re-decoding the whole answer so multi-token characters come out whole."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer = tokenizer
        self.out = out
        self.tokens: list[int] = []
        self.printed = ""

    def add(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return
        self.out.write(text[len(self.printed) :])
        self.out.flush()
        self.printed = text


def sampling_arguments(args: argparse.Namespace) -> dict:
    if args.temperature <= 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}


def run_speculative(args, target, tokenizer, draft, ids, stream: TextStream) -> tuple[list[int], dict]:
    """Streams the answer; returns (tokens, stats with seconds and acceptance length)."""
    eos = target.generation_config.eos_token_id
    torch.manual_seed(args.seed)
    synchronize(target.device)
    started = time.perf_counter()
    if args.method in ("loop", "loop_static"):
        from .speculative import speculative_generate

        out = speculative_generate(
            target,
            draft,
            ids,
            max_new_tokens=args.max_new_tokens,
            eos_token_id=eos,
            return_stats=True,
            on_round=lambda event: stream.add(event.emitted),
            static_cache=args.method == "loop_static",
            compile_steps=args.compile,
            skinny_kernels=args.skinny_kernels,
            **sampling_arguments(args),
        )
        synchronize(target.device)
        tokens = out.generated[0]
        rounds = out.stats["rounds"]
        acceptance = out.stats["mean_acceptance_length"]
    else:
        from transformers.generation.streamers import BaseStreamer

        class Forward(BaseStreamer):
            first = True

            def put(self, value):
                if self.first:  # generate() first hands over the prompt
                    self.first = False
                    return
                stream.add(value.flatten().tolist())

            def end(self):
                pass

        calls = draft_calls(draft)
        sequences = target.generate(
            ids,
            assistant_model=draft,
            max_new_tokens=args.max_new_tokens,
            streamer=Forward(),
            **sampling_arguments(args),
        )
        synchronize(target.device)
        tokens = sequences[0, ids.shape[1] :].tolist()
        rounds = calls()
        # the first token comes from the target's prefill; every round after it emits accepted + 1 tokens
        acceptance = (len(tokens) - 1) / rounds if rounds else float("nan")
    seconds = time.perf_counter() - started
    return tokens, {"seconds": seconds, "rounds": rounds, "mean_acceptance_length": acceptance}


def draft_calls(draft):
    """Counts the draft's `generate` calls (one per assisted round) until the returned function is called."""
    original = draft.generate
    count = [0]

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    draft.generate = counted

    def finish() -> int:
        del draft.generate
        return count[0]

    return finish


def run_plain(args, target, ids) -> tuple[list[int], float]:
    torch.manual_seed(args.seed)
    synchronize(target.device)
    started = time.perf_counter()
    sequences = target.generate(ids, max_new_tokens=args.max_new_tokens, **sampling_arguments(args))
    synchronize(target.device)
    return sequences[0, ids.shape[1] :].tolist(), time.perf_counter() - started


def warm_up(target, draft, ids, args: argparse.Namespace) -> None:
    """One pass of each path, so that one-off costs (allocations, kernel choice) do not skew the comparison.

    The fixed-shape path warms up with the run's own length and sampling setting: its caches, CUDA graphs and compiled
    steps are made for exactly that, as a server would have made them once, before the first request."""
    from .speculative import speculative_generate

    static = args.method == "loop_static"
    speculative_generate(
        target,
        draft,
        ids,
        max_new_tokens=args.max_new_tokens if static else 4,
        static_cache=static,
        compile_steps=args.compile,
        skinny_kernels=args.skinny_kernels and static,
        **sampling_arguments(args),
    )
    target.generate(ids, max_new_tokens=4, do_sample=False)


def resolve_method(method: str, compile_steps: bool, target, skinny_kernels: bool = False) -> str:
    """`auto`: the fixed-shape path where it is the fast one (on a GPU: graphs remove the launch overhead that makes
    an eager loop slower than plain decoding there) and the target supports it, or when asked to compile it."""
    if method != "auto":
        return method
    if compile_steps or skinny_kernels:
        return "loop_static"
    if target.device.type != "cuda":
        return "loop"
    from .static_loop import check_static_support

    try:
        check_static_support(target)
    except ValueError:
        return "loop"
    return "loop_static"


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise ValueError("dspark generate: --max-new-tokens must be >= 1")
    if args.compile and args.method not in ("auto", "loop_static"):
        raise ValueError("dspark generate: --compile needs --method loop_static (it compiles the fixed-shape steps)")
    if args.skinny_kernels and args.method not in ("auto", "loop_static"):
        raise ValueError("dspark generate: --skinny-kernels needs --method loop_static (they run in its verify step)")
    device = torch.device(args.device)
    print(f"loading target={args.target} draft={args.draft} on {device} ...", file=sys.stderr)
    target, tokenizer, draft = pair.load_pair(args.target, args.draft, device=device, dtype=args.dtype)
    args.method = resolve_method(args.method, args.compile, target, args.skinny_kernels)
    ids = prompt_ids(tokenizer, args.prompt, args.raw, device)
    warm_up(target, draft, ids, args)

    stream = TextStream(tokenizer)
    tokens, stats = run_speculative(args, target, tokenizer, draft, ids, stream)
    print()
    report = {
        "method": args.method,
        "new_tokens": len(tokens),
        "mean_acceptance_length": stats["mean_acceptance_length"],
        "rounds": stats["rounds"],
        "speculative_tokens_per_second": len(tokens) / stats["seconds"],
    }
    if not args.no_compare:
        plain_tokens, plain_seconds = run_plain(args, target, ids)
        report["plain_tokens_per_second"] = len(plain_tokens) / plain_seconds
        report["speedup"] = report["speculative_tokens_per_second"] / report["plain_tokens_per_second"]
        if args.temperature <= 0:
            report["identical_to_plain"] = plain_tokens == tokens
    print("-" * 60, file=sys.stderr)
    line = (
        f"acceptance length {report['mean_acceptance_length']:.2f} tokens/round over {report['rounds']} rounds | "
        f"{report['speculative_tokens_per_second']:.1f} tok/s"
    )
    if "speedup" in report:
        line += f" vs plain {report['plain_tokens_per_second']:.1f} tok/s | speedup {report['speedup']:.2f}x"
    if "identical_to_plain" in report:
        line += " | identical to plain greedy" if report["identical_to_plain"] else " | DIFFERS from plain greedy"
    print(line, file=sys.stderr)
    if args.json:
        print(json.dumps(report))
    return 0
