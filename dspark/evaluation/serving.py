"""ABBA throughput against two OpenAI-compatible servers: one with speculative decoding, one without (e.g. vLLM).

The same protocol as `dspark.evaluation.bench`: waves of `concurrency` chat requests sent at once, the two servers
alternating A B | B A per round, paired speedup with a bootstrap interval, failed requests recorded and never averaged
in, and the two servers' greedy texts compared prompt by prompt. The client is plain `urllib` (no extra dependency);
it needs only the servers' URLs, so it runs wherever the servers can be reached, vLLM installed here or not.
"""

from __future__ import annotations

import importlib.util
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .bench import GenerationMethod, GenerationRun, run_abba, summarize

SPEC, NO_SPEC = "spec", "no_spec"


@dataclass
class PromptWave:
    """Prompts sent together (the server batches them): the serving analogue of a `Workload`."""

    index: int
    texts: list[str]
    prompt_ids: list[str]

    @property
    def batch_size(self) -> int:
        return len(self.texts)


def api_root(url: str) -> str:
    """`http://host:8000`, `http://host:8000/` and `http://host:8000/v1` all name the same API root."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def request_json(url: str, payload: dict | None, timeout: float) -> dict:
    """GET (payload None) or POST JSON; HTTP and connection errors become RuntimeErrors naming the URL."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read().decode())
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")[:300]
        raise RuntimeError(f"{url} answered HTTP {error.code}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        raise RuntimeError(f"{url} cannot be reached: {error}") from None


def served_model(url: str, timeout: float = 30.0) -> str:
    """The first model a server lists under /v1/models."""
    listing = request_json(f"{api_root(url)}/v1/models", None, timeout)
    models = [entry["id"] for entry in listing.get("data", [])]
    if not models:
        raise RuntimeError(f"{url} lists no models under /v1/models.")
    return models[0]


def chat_completion(url: str, model: str, prompt: str, max_tokens: int, timeout: float) -> tuple[str, int]:
    """(text, completion tokens) of one greedy chat completion."""
    answer = request_json(
        f"{api_root(url)}/v1/chat/completions",
        {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "seed": 0,
        },
        timeout,
    )
    text = answer["choices"][0]["message"]["content"] or ""
    return text, int(answer.get("usage", {}).get("completion_tokens", 0))


def server_method(name: str, url: str, model: str, max_tokens: int, timeout: float) -> GenerationMethod:
    """A method that sends a wave's prompts concurrently and waits for all answers."""

    def run(wave: PromptWave) -> GenerationRun:
        with ThreadPoolExecutor(max_workers=wave.batch_size) as pool:
            answers = list(pool.map(lambda text: chat_completion(url, model, text, max_tokens, timeout), wave.texts))
        return GenerationRun(outputs=[text for text, _ in answers], tokens=sum(count for _, count in answers))

    return GenerationMethod(name, run)


def run_serving_bench(
    spec_url: str | None,
    base_url: str | None,
    prompts: list[str],
    prompt_ids: list[str],
    *,
    concurrency: list[int],
    rounds: int,
    max_tokens: int,
    model: str | None = None,
    timeout: float = 600.0,
    replicates: int = 2000,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """ABBA between the two servers at every concurrency; {"skipped": reason} when they are not configured."""
    vllm_installed = importlib.util.find_spec("vllm") is not None
    if not spec_url or not base_url:
        return {
            "skipped": "no servers configured (pass --serving-spec-url and --serving-base-url)",
            "vllm_installed": vllm_installed,
        }
    model = model or served_model(base_url, timeout)
    methods = [
        server_method(NO_SPEC, base_url, model, max_tokens, timeout),
        server_method(SPEC, spec_url, model, max_tokens, timeout),
    ]
    measurements = []
    for size in concurrency:
        waves = []
        for index in range(max(1, -(-len(prompts) // size))):
            chosen = [(index * size + row) % len(prompts) for row in range(size)]
            waves.append(PromptWave(index, [prompts[i] for i in chosen], [prompt_ids[i] for i in chosen]))
        measurements += run_abba(methods, waves, rounds, "cpu", progress=progress)
    return {
        "spec_url": spec_url,
        "base_url": base_url,
        "model": model,
        "vllm_installed": vllm_installed,
        "baseline": NO_SPEC,
        "summary": summarize(measurements, NO_SPEC, replicates=replicates, seed=seed),
        "measurements": [m.to_dict() for m in measurements],
    }
