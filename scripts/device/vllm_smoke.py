"""GPU smoke test of patched vLLM 0.23.0 serving SmolLM2-135M-Instruct, bf16 and NVFP4, with the shipped DSpark draft.

Runs after `source scripts/device/vllm_stage.sh assemble ...` and `dspark vllm patch --vllm-root /tmp/site`
(scripts/device/vllm_smoke.sh does both). Not run on CI: it needs the GPU machine.

1. The targets: `dspark vllm export-target` of the SmolLM2 GGUF ($DSPARK_SMOLLM2_GGUF), once bf16 and once NVFP4
   (ModelOpt W4A16_NVFP4; on Hopper vLLM runs it through the Marlin FP4 GEMM).
2. The draft: `dspark vllm export dspark/default_draft` (anchor-first, Markov head, confidence head).
3. Per target, two `vllm serve` processes side by side on FLASH_ATTN, eager: the target alone and the target with the
   draft (`method: dflash`, `draft_sample_method: probabilistic`, num_speculative_tokens = the draft's block size).
4. Greedy completions of the speculative server must match the target alone; sampled completions run 4 requests at
   once (the per-request temperature expansion for batches >= 2); acceptance comes from the spec-decode counters.
5. `dspark bench --serving-spec-url ... --serving-base-url ...` at concurrency 1 and 8 (ABBA, paired speedups).
Every step prints `[smoke] step: ...`; a failure prints `SMOKE FAILED at step '...'` with the error and exits 1.
Writes $OUT/vllm_smoke.json, $OUT/bench_<target>/ and the server logs. About 8 minutes on one H200 (4 server starts
in 2 parallel pairs, ~1.5 min each pair, plus the bench).
"""

from __future__ import annotations

import argparse
import contextlib
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
from dspark.vllm.target_export import export_target  # noqa: E402

PROMPTS = [
    "Explain photosynthesis in two sentences.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "What is the capital of France, and what is it famous for?",
    "List three tips for writing clear documentation.",
]
SPEC_COUNTERS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")
TARGETS = {"bf16": Path("/tmp/smollm2-bf16"), "nvfp4": Path("/tmp/smollm2-nvfp4")}
BENCH_CONCURRENCY = ("1", "8")
# Both servers on vLLM's V1 model runner: 0.23 runs DFlash drafts only there, and its V2 runner would give the
# target-alone server a different engine. FlashInfer is not carried (scripts/device/stage_vllm.py), so sampling
# uses vLLM's own top-k/top-p kernels; without the variable the V2 runner's sampler imports FlashInfer and fails.
SERVER_ENV = {"VLLM_USE_V2_MODEL_RUNNER": "0", "VLLM_USE_FLASHINFER_SAMPLER": "0"}


class StepFailed(RuntimeError):
    pass


@contextlib.contextmanager
def step(name: str, result: dict):
    """Announce a step; on any error record and print which one failed, then stop the run."""
    print(f"[smoke] step: {name}", flush=True)
    started = time.time()
    try:
        yield
    except Exception as error:
        result["failed_step"] = name
        result["error"] = f"{type(error).__name__}: {error}"
        print(f"SMOKE FAILED at step '{name}': {result['error']}", flush=True)
        raise StepFailed(name) from error
    result.setdefault("step_seconds", {})[name] = round(time.time() - started, 1)


def prepare_targets() -> list[str]:
    """Export the target bf16 and NVFP4 (`dspark vllm export-target`); return the chat-formatted prompts."""
    import torch

    model, tokenizer = load_smollm2(dtype=torch.float32)
    for label, folder in TARGETS.items():
        exported = export_target(
            model,
            tokenizer,
            folder,
            eos_token_id=SMOLLM2_END_OF_TURN_ID,
            nvfp4_weights=label == "nvfp4",
            overwrite=True,
        )
        for note in exported.notes:
            print(f"  {label}: {note}")
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in PROMPTS
    ]


class Server:
    """One `vllm serve` process, stopped on exit."""

    def __init__(self, model: Path, port: int, log: Path, speculative: dict | None):
        command = [shutil.which("vllm") or "vllm", "serve", str(model), "--port", str(port)]
        # A fixed KV-cache size: with two servers starting side by side, vLLM's memory profiling would count the
        # other server's KV-cache allocation as its own and find no memory left ("No available memory for the cache
        # blocks", seen on the NVFP4 pair).
        command += ["--max-model-len", "2048", "--kv-cache-memory-bytes", str(4 * 2**30), "--enforce-eager"]
        if speculative is not None:
            command += ["--speculative-config", json.dumps(speculative)]
        self.url = f"http://127.0.0.1:{port}"
        self.log = log.open("w")
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **SERVER_ENV}
        )

    def __enter__(self) -> Server:
        try:
            return self._wait_until_healthy()
        except BaseException:
            self.__exit__()  # a server that never came up must not outlive the step
            raise

    def _wait_until_healthy(self) -> Server:
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
        if self.process.poll() is None:
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


def acceptance(counters: dict[str, float]) -> dict[str, float]:
    drafts = counters["num_drafts"] or 1.0
    return {
        **counters,
        "acceptance_length": 1.0 + counters["num_accepted_tokens"] / drafts,
        "acceptance_rate": counters["num_accepted_tokens"] / (counters["num_draft_tokens"] or 1.0),
    }


def serve_and_compare(label: str, target: Path, prompts: list[str], speculative: dict, out: Path, result: dict) -> None:
    """Both servers for one target: greedy identity, sampled batch, acceptance, then `dspark bench` against them."""
    record: dict = {}
    result["targets"][label] = record
    base_port, spec_port = (8011, 8012) if label == "bf16" else (8021, 8022)
    with step(f"{label}: start vllm serve (target alone and with the DSpark draft)", result):
        stack = contextlib.ExitStack()
        # Both processes start before either is waited for, so the two start-ups overlap.
        servers = [
            Server(target, base_port, out / f"serve_{label}_target.log", None),
            Server(target, spec_port, out / f"serve_{label}_dspark.log", speculative),
        ]
        try:
            base_server, spec_server = (stack.enter_context(server) for server in servers)
        except BaseException:
            for server in servers:
                server.__exit__()
            stack.close()
            raise
        base, spec = base_server, spec_server
    with stack:
        with step(f"{label}: greedy completions, target alone vs speculative", result):
            baseline = [base.complete(target, prompt, 0.0) for prompt in prompts]
            greedy = [spec.complete(target, prompt, 0.0) for prompt in prompts]
            record["greedy_identical"] = [a == b for a, b in zip(baseline, greedy, strict=True)]
            record["greedy"] = {"target": baseline, "dspark": greedy}
            record["acceptance_greedy"] = acceptance(spec.spec_counters())
        with step(f"{label}: 4 concurrent sampled requests on the speculative server", result):
            with ThreadPoolExecutor(len(prompts)) as pool:
                record["sampled"] = list(pool.map(lambda prompt: spec.complete(target, prompt, 0.8), prompts))
            record["acceptance_all"] = acceptance(spec.spec_counters())
        with step(f"{label}: dspark bench --serving-* at concurrency {' and '.join(BENCH_CONCURRENCY)}", result):
            # The local half of the bench needs a transformers-loadable target: the bf16 folder (same tokenizer).
            command = [sys.executable, "-m", "dspark.cli", "bench", "--target", str(TARGETS["bf16"])]
            command += ["--draft", "none", "--methods", "plain", "--batch-sizes", "1", "--rounds", "2", "--limit", "3"]
            command += ["--max-new-tokens", "64", "--bootstrap-replicates", "500", "--no-progress"]
            command += ["--serving-spec-url", spec.url, "--serving-base-url", base.url]
            command += ["--serving-model", str(target), "--serving-concurrency", *BENCH_CONCURRENCY]
            command += ["--out", str(out / f"bench_{label}")]
            with (out / f"bench_{label}.log").open("w") as log:
                done = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            if done.returncode:
                raise RuntimeError(f"dspark bench exited with {done.returncode}; see {out / f'bench_{label}.log'}")
            bench = json.loads((out / f"bench_{label}" / "bench.json").read_text())
            record["bench_serving_summary"] = bench.get("serving", {}).get("summary")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/vllm_smoke_out")))
    parser.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    draft = Path("/tmp/dspark-draft-vllm")
    result: dict = {"targets": {}}
    started = time.time()
    try:
        with step("export the target (bf16 and NVFP4) with dspark vllm export-target", result):
            prompts = prepare_targets()
        with step("export the draft with dspark vllm export", result):
            exported = export_for_vllm(REPO / "dspark" / "default_draft", draft, overwrite=True)
            speculative = {
                "method": "dflash",
                "model": str(draft),
                "num_speculative_tokens": exported.num_speculative_tokens,
                "attention_backend": "FLASH_ATTN",
                "draft_sample_method": "probabilistic",
            }
            result.update(speculative_config=speculative, notes=exported.notes)
        for label in args.targets:
            serve_and_compare(label, TARGETS[label], prompts, speculative, args.out, result)
    except StepFailed:
        return 1
    finally:
        result["total_seconds"] = round(time.time() - started, 1)
        (args.out / "vllm_smoke.json").write_text(json.dumps(result, indent=2))
        brief = {
            label: {k: v for k, v in record.items() if k not in ("greedy", "sampled")}
            for label, record in result["targets"].items()
        }
        print(json.dumps({**{k: v for k, v in result.items() if k != "targets"}, "targets": brief}, indent=2))
    for label, record in result["targets"].items():
        if not all(record.get("greedy_identical", [])):
            print(f"{label}: greedy outputs differ from the target alone (bf16 kernels can diverge late; see the JSON)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
