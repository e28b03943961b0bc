"""`dspark selfcheck`: prove on this machine that speculative decoding with a DSpark draft is lossless.

Builds tiny random Llama and Qwen3 targets (no download), fits a fresh draft to each, and checks that
`target.generate(..., assistant_model=draft)` returns exactly the target's own greedy output through both ways in
(the draft's Markov-aware `generate`, and transformers' built-in DFlash path), then saves the draft with its remote
code and reloads it through `AutoModel.from_pretrained(..., trust_remote_code=True)`.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from transformers import AutoModel, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from .modeling_dspark import DSparkDraftModel

COMMAND = "selfcheck"
HELP = "check that speculative decoding reproduces the target's greedy output (tiny random models, CPU, offline)"

TINY_SHAPES = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    initializer_range=0.1,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)


def tiny_targets(seed: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    llama = LlamaForCausalLM(LlamaConfig(**TINY_SHAPES)).eval()
    torch.manual_seed(seed)
    qwen3 = Qwen3ForCausalLM(Qwen3Config(head_dim=16, **TINY_SHAPES)).eval()
    return {"llama": llama, "qwen3": qwen3}


def count_forwards(model: torch.nn.Module) -> list[int]:
    """A counter incremented on every forward of `model` (the hook is removed by the caller)."""
    counter = [0]
    model._selfcheck_hook = model.register_forward_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
    return counter


def run_case(target, draft, prompt: torch.Tensor, max_new_tokens: int, **generate_kwargs) -> dict:
    counter = count_forwards(target)
    try:
        started = time.perf_counter()
        output = target.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
        seconds = time.perf_counter() - started
    finally:
        target._selfcheck_hook.remove()
    return {"output": output, "target_forwards": counter[0], "seconds": seconds}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--block-size", type=int, default=8)


def run(args: argparse.Namespace) -> int:
    failures = 0
    prompt = torch.randint(0, TINY_SHAPES["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(args.seed))
    print(f"{'target':8} {'path':26} {'identical':>9} {'tokens':>6} {'target fwd':>10} {'seconds':>8}")
    for name, target in tiny_targets(args.seed).items():
        torch.manual_seed(args.seed + 1)
        draft = DSparkDraftModel.from_target(
            target, block_size=args.block_size, markov_rank=16, enable_confidence_head=True
        ).eval()
        plain = run_case(target, None, prompt, args.max_new_tokens)
        with tempfile.TemporaryDirectory() as folder:
            draft.save_pretrained(folder)
            reloaded = AutoModel.from_pretrained(folder, trust_remote_code=True).eval().bind_target(target)
        cases = {
            "plain generate": plain,
            "assistant_model (Markov)": run_case(target, draft, prompt, args.max_new_tokens, assistant_model=draft),
            "speculation_type=dflash": run_case(
                target, draft, prompt, args.max_new_tokens, assistant_model=draft, speculation_type="dflash"
            ),
            "reloaded remote code": run_case(target, reloaded, prompt, args.max_new_tokens, assistant_model=reloaded),
        }
        for path, result in cases.items():
            identical = torch.equal(result["output"], plain["output"])
            failures += not identical
            tokens = result["output"].shape[1] - prompt.shape[1]
            print(
                f"{name:8} {path:26} {str(identical):>9} {tokens:>6} {result['target_forwards']:>10} "
                f"{result['seconds']:>8.3f}"
            )
    print("selfcheck:", "OK" if failures == 0 else f"{failures} case(s) differ from the target's greedy output")
    print("(random drafts accept little; a trained draft cuts target forwards per token, the output stays identical)")
    return 1 if failures else 0
