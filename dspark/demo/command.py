"""`dspark demo`: serve the Gradio demo locally (or through a public share link) for any target + draft.

With no model arguments it serves the embedded default pair (SmolLM2-135M-Instruct + its shipped DSpark draft) on
the CPU, offline.
"""

from __future__ import annotations

import argparse
import sys

from .. import pair
from .handlers import DemoLimits

COMMAND = "demo"
HELP = "serve the Gradio demo: plain vs speculative decoding side by side, rounds in colour, measured speedup"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=pair.DEFAULT_TARGET, help="smollm2 (default) or a HF model path")
    parser.add_argument("--draft", default=pair.DEFAULT_DRAFT, help="default (the embedded draft) or a draft path")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=DemoLimits.max_new_tokens,
        help="the most tokens one request may ask for (the slider's maximum)",
    )
    parser.add_argument("--max-prompt-tokens", type=int, default=DemoLimits.max_prompt_tokens)
    parser.add_argument("--max-queue", type=int, default=16, help="requests allowed to wait; more are turned away")


def run(args: argparse.Namespace) -> int:
    from .app import GradioMissingError, PageOptions, build_demo, require_gradio
    from .models import load_session

    if args.max_new_tokens < 1 or args.max_prompt_tokens < 1 or args.max_queue < 1:
        raise ValueError("dspark demo: --max-new-tokens, --max-prompt-tokens and --max-queue must be >= 1")
    try:
        require_gradio()  # before the model load, which takes a while
    except GradioMissingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"loading target={args.target} draft={args.draft} on {args.device} ...", file=sys.stderr)
    limits = DemoLimits(max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens)
    session = load_session(args.target, args.draft, device=args.device, dtype=args.dtype, limits=limits)
    options = PageOptions(target_name=args.target, draft_name=args.draft, max_queue=args.max_queue)
    build_demo(session, options).launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0
