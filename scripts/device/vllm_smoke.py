"""GPU smoke test of patched vLLM 0.23.0 serving SmolLM2-135M-Instruct with the shipped DSpark draft.

Runs after `source scripts/device/vllm_stage.sh assemble ...` and `dspark vllm patch --vllm-root /tmp/site`
(scripts/device/vllm_smoke.sh does both). Not run on CI: it needs the GPU machine.

1. The target: the SmolLM2 GGUF ($DSPARK_SMOLLM2_GGUF) dequantised by transformers and saved as a bf16 HF folder.
2. The draft: `dspark vllm export dspark/default_draft` (anchor-first, Markov head, confidence head).
3. Two `vllm serve` runs on FLASH_ATTN, eager: the target alone, then with the draft
   (`method: dflash`, `draft_sample_method: probabilistic`, num_speculative_tokens = the draft's block size).
4. Greedy completions must match the target alone; sampled completions run 4 requests at once (the per-request
   temperature expansion for batches >= 2); acceptance comes from the server's spec-decode counters.
Writes $OUT/vllm_smoke.json and the server logs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from dspark.targets import SMOLLM2_END_OF_TURN_ID, load_smollm2  # noqa: E402
from dspark.vllm.export import export_for_vllm  # noqa: E402

PROMPTS = [
    "Explain photosynthesis in two sentences.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "What is the capital of France, and what is it famous for?",
    "List three tips for writing clear documentation.",
]
SPEC_COUNTERS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")


def prepare_target(folder: Path) -> list[str]:
    """Save the dequantised target as an HF folder; return the chat-formatted prompts."""
    import torch

    model, tokenizer = load_smollm2(dtype=torch.bfloat16)
    model.generation_config.eos_token_id = SMOLLM2_END_OF_TURN_ID
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in PROMPTS
    ]


class Server:
    """One `vllm serve` process, stopped on exit."""

    def __init__(self, model: Path, port: int, log: Path, speculative: dict | None):
        command = [shutil.which("vllm") or "vllm", "serve", str(model), "--port", str(port)]
        command += ["--max-model-len", "2048", "--gpu-memory-utilization", "0.3", "--enforce-eager"]
        if speculative is not None:
            command += ["--speculative-config", json.dumps(speculative)]
        self.url = f"http://127.0.0.1:{port}"
        self.log = log.open("w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self) -> Server:
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.process.returncode}; see {self.log.name}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(2)
        raise TimeoutError(f"vllm serve did not come up in 300 s; see {self.log.name}")

    def __exit__(self, *exc) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.log.close()

    def complete(self, model: Path, prompt: str, temperature: float, max_tokens: int = 96) -> str:
        body = {"model": str(model), "prompt": prompt, "temperature": temperature, "max_tokens": max_tokens}
        response = requests.post(f"{self.url}/v1/completions", json=body, timeout=120)
        response.raise_for_status()
        return response.json()["choices"][0]["text"]

    def spec_counters(self) -> dict[str, float]:
        text = requests.get(f"{self.url}/metrics", timeout=10).text
        counters = {}
        for name in SPEC_COUNTERS:
            values = re.findall(rf"^vllm:spec_decode_{name}_total(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.MULTILINE)
            counters[name] = sum(float(value) for value in values)
        return counters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/vllm_smoke_out")))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    target, draft = Path("/tmp/smollm2-hf"), Path("/tmp/dspark-draft-vllm")
    prompts = prepare_target(target)
    exported = export_for_vllm(REPO / "dspark" / "default_draft", draft, overwrite=True)
    speculative = {
        "method": "dflash",
        "model": str(draft),
        "num_speculative_tokens": exported.num_speculative_tokens,
        "attention_backend": "FLASH_ATTN",
        "draft_sample_method": "probabilistic",
    }
    result: dict = {"speculative_config": speculative, "notes": exported.notes}

    with Server(target, 8011, args.out / "serve_target.log", None) as server:
        baseline = [server.complete(target, prompt, 0.0) for prompt in prompts]
    started = time.time()
    with Server(target, 8012, args.out / "serve_dspark.log", speculative) as server:
        greedy = [server.complete(target, prompt, 0.0) for prompt in prompts]
        after_greedy = server.spec_counters()
        with ThreadPoolExecutor(len(prompts)) as pool:  # concurrent: a batch of >= 2 sampled requests
            sampled = list(pool.map(lambda prompt: server.complete(target, prompt, 0.8), prompts))
        after_sampled = server.spec_counters()
    result["serve_seconds"] = round(time.time() - started, 1)
    result["greedy_identical"] = [a == b for a, b in zip(baseline, greedy, strict=True)]
    result["greedy"] = {"target": baseline, "dspark": greedy}
    result["sampled"] = sampled
    for label, counters in (("greedy", after_greedy), ("all", after_sampled)):
        drafts = counters["num_drafts"] or 1.0
        result[f"acceptance_{label}"] = {
            **counters,
            "acceptance_length": 1.0 + counters["num_accepted_tokens"] / drafts,
            "acceptance_rate": counters["num_accepted_tokens"] / (counters["num_draft_tokens"] or 1.0),
        }
    (args.out / "vllm_smoke.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({key: value for key, value in result.items() if key not in ("greedy", "sampled")}, indent=2))
    if not all(result["greedy_identical"]):
        print("greedy outputs differ from the target alone (bf16 kernels can diverge late; inspect the JSON)")


if __name__ == "__main__":
    main()
