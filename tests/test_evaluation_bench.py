"""The benchmark protocol: ABBA scheduling, aggregation on synthetic timings, failed runs reported and never averaged
in, batch-1-only methods skipped with a note, token match; the serving client against a local fake server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from dspark.evaluation.bench import (
    GenerationMethod,
    GenerationRun,
    Measurement,
    abba_order,
    abba_schedule,
    paired_speedup,
    run_abba,
    skipped_methods,
    summarize,
)
from dspark.evaluation.serving import run_serving_bench


class FakeClock:
    """A clock that only moves when a fake method 'works', so timings are exact."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Workload:
    def __init__(self, index: int, batch_size: int = 1, width: int = 4):
        self.index, self.batch_size = index, batch_size
        self.input_ids = torch.zeros(batch_size, width, dtype=torch.long)


def fake_method(
    name: str, clock: FakeClock, seconds: float, tokens: int, calls: list, fail_on=(), batch_one_only=False
):
    """Takes `seconds` per run and emits `tokens` tokens per row; raises on the listed call numbers."""
    count = {"calls": 0}

    def run(workload) -> GenerationRun:
        count["calls"] += 1
        calls.append((workload.index, name))
        clock.now += seconds
        if count["calls"] in fail_on:
            raise RuntimeError(f"{name} ran out of memory")
        return GenerationRun([[7] * tokens for _ in range(workload.batch_size)])

    return GenerationMethod(name, run, batch_one_only=batch_one_only)


def test_abba_order_alternates_every_round():
    assert abba_schedule(["A", "B"], 4) == [
        (0, "A"),
        (0, "B"),
        (1, "B"),
        (1, "A"),
        (2, "A"),
        (2, "B"),
        (3, "B"),
        (3, "A"),
    ]
    assert abba_order(["plain", "assisted", "loop"], 1) == ["loop", "assisted", "plain"]


def test_runs_follow_the_schedule_after_one_untimed_warm_up_per_method():
    clock, calls = FakeClock(), []
    methods = [fake_method("A", clock, 1.0, 10, calls), fake_method("B", clock, 0.5, 10, calls)]
    measurements = run_abba(methods, [Workload(0), Workload(1)], rounds=2, clock=clock)
    # warm-ups (A, B) on the longest (here the first) workload only, then A B | B A on each workload
    assert calls == [(0, "A"), (0, "B"), (0, "A"), (0, "B"), (0, "B"), (0, "A"), (1, "A"), (1, "B"), (1, "B"), (1, "A")]
    assert [(m.workload, m.round, m.order, m.method) for m in measurements[:4]] == [
        (0, 0, 0, "A"),
        (0, 0, 1, "B"),
        (0, 1, 0, "B"),
        (0, 1, 1, "A"),
    ]
    assert all(m.seconds == (1.0 if m.method == "A" else 0.5) and m.tokens == 10 for m in measurements)


def test_each_batch_size_warms_up_on_its_longest_prompt():
    """The static loop sizes its caches (graphs, compiled steps) for the longest prompt it has seen: warming up on
    the longest keeps that work out of the timed runs."""
    clock, calls = FakeClock(), []
    workloads = [Workload(0, width=3), Workload(1, width=9), Workload(2, width=5), Workload(3, batch_size=2, width=2)]
    run_abba([fake_method("A", clock, 1.0, 10, calls)], workloads, rounds=1, clock=clock)
    # batch 1: warm-up on workload 1 (width 9), then one timed run each; batch 2: its only workload, twice
    assert calls == [(1, "A"), (0, "A"), (1, "A"), (2, "A"), (3, "A"), (3, "A")]


def test_aggregation_on_synthetic_timings_and_a_failed_run_is_reported_not_averaged():
    clock, calls = FakeClock(), []
    methods = [
        fake_method("plain", clock, 2.0, 20, calls),
        fake_method("fast", clock, 1.0, 20, calls),
        # call 1 is the warm-up; call 3 is a timed run, which fails and must not count
        fake_method("flaky", clock, 0.1, 20, calls, fail_on=(3,)),
        fake_method("broken", clock, 0.1, 20, calls, fail_on=range(100)),
    ]
    measurements = run_abba(methods, [Workload(i) for i in range(3)], rounds=2, clock=clock)
    summary = summarize(measurements, "plain", replicates=200)["1"]
    assert summary["plain"]["tokens_per_second"] == pytest.approx(10.0)
    assert summary["plain"]["time_per_output_token_ms"] == pytest.approx(100.0)
    assert summary["fast"]["tokens_per_second"] == pytest.approx(20.0)
    assert summary["fast"]["vs_plain"]["speedup"] == pytest.approx(2.0)
    assert summary["fast"]["vs_plain"]["speedup_ci"] == pytest.approx([2.0, 2.0])
    assert summary["fast"]["vs_plain"]["ci_cluster"] == "workload"
    flaky = summary["flaky"]
    assert flaky["runs"] == 5 and flaky["failed_runs"] == 1
    assert flaky["errors"] == ["RuntimeError: flaky ran out of memory"]
    assert flaky["tokens"] == 100 and flaky["tokens_per_second"] == pytest.approx(200.0)
    assert flaky["vs_plain"]["paired_cells"] == 5 and flaky["vs_plain"]["speedup"] == pytest.approx(20.0)
    broken = summary["broken"]
    assert broken["runs"] == 0 and broken["failed_runs"] == 6 and broken["tokens_per_second"] is None
    assert broken["vs_plain"] is None and broken["token_match"] is None


def test_paired_speedup_is_a_ratio_of_sums_with_an_interval_over_workloads():
    def measurement(method, workload, round_index, seconds, tokens):
        return Measurement(method, 1, workload, round_index, 0, seconds=seconds, tokens=tokens)

    baseline = [measurement("plain", w, r, 1.0 + w, 10) for w in range(4) for r in range(2)]
    candidate = [measurement("loop", w, r, 0.5 + w, 10) for w in range(4) for r in range(2)]
    result = paired_speedup(candidate, baseline, replicates=500, confidence=0.95, seed=0)
    # (80 tokens / 16 s) / (80 tokens / 20 s)
    assert result["speedup"] == pytest.approx(20.0 / 16.0)
    low, high = result["speedup_ci"]
    assert low < result["speedup"] < high
    single = paired_speedup(candidate[:2], baseline[:2], replicates=100, confidence=0.95, seed=0)
    assert single["ci_cluster"] == "round"


def test_batch_one_only_methods_are_skipped_with_a_note_and_outputs_are_compared():
    clock, calls = FakeClock(), []
    methods = [
        fake_method("plain", clock, 1.0, 5, calls),
        fake_method("assisted", clock, 1.0, 5, calls, batch_one_only=True),
    ]
    measurements = run_abba(methods, [Workload(0, batch_size=2)], rounds=2, clock=clock)
    assert {m.method for m in measurements} == {"plain"}
    assert "batch size 1 only" in skipped_methods(methods, 2)["assisted"] and skipped_methods(methods, 1) == {}
    same = GenerationMethod("same", lambda w: GenerationRun([[7] * 5, [7] * 5]))
    other = GenerationMethod("other", lambda w: GenerationRun([[7] * 5, [7, 7, 8, 7, 7]]))
    summary = summarize(run_abba([methods[0], same, other], [Workload(0, 2)], rounds=2, clock=clock))["2"]
    assert summary["same"]["token_match"] == {"rows": 2, "identical": 2, "rate": 1.0, "mean_matching_prefix": 1.0}
    assert summary["other"]["token_match"]["identical"] == 1
    assert summary["other"]["token_match"]["mean_matching_prefix"] == pytest.approx((1.0 + 0.4) / 2)


class FakeOpenAIServer:
    """A local OpenAI-compatible server answering every chat request with the same greedy text."""

    def __init__(self, text: str):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self.reply({"data": [{"id": "tiny"}]})

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append(request)
                self.reply(
                    {
                        "choices": [{"message": {"content": owner.text}}],
                        "usage": {"completion_tokens": min(request["max_tokens"], 5)},
                    }
                )

        self.text, self.requests = text, []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_serving_client_runs_abba_against_two_servers_and_skips_cleanly_without_them():
    assert (
        "no servers configured"
        in run_serving_bench(None, None, ["hi"], ["p0"], concurrency=[1], rounds=2, max_tokens=8)["skipped"]
    )
    spec, base = FakeOpenAIServer("hello there"), FakeOpenAIServer("hello there")
    try:
        report = run_serving_bench(
            spec.url,
            base.url,
            ["hi", "why?", "how?"],
            ["p0", "p1", "p2"],
            concurrency=[1, 2],
            rounds=2,
            max_tokens=8,
            replicates=100,
        )
    finally:
        spec.close()
        base.close()
    assert report["model"] == "tiny" and report["baseline"] == "no_spec"
    assert spec.requests[0]["temperature"] == 0.0 and spec.requests[0]["messages"][0]["content"] == "hi"
    at_two = report["summary"]["2"]
    assert at_two["no_spec"]["runs"] == 4 and at_two["spec"]["runs"] == 4  # 2 waves x 2 rounds
    assert at_two["spec"]["tokens"] == 4 * 2 * 5
    assert at_two["spec"]["token_match"]["rate"] == 1.0 and at_two["spec"]["vs_no_spec"]["speedup"] > 0
    unreachable = run_serving_bench(
        "http://127.0.0.1:9",
        "http://127.0.0.1:9",
        ["hi"],
        ["p0"],
        concurrency=[1],
        rounds=2,
        max_tokens=4,
        model="tiny",
        timeout=2.0,
    )
    entry = unreachable["summary"]["1"]["spec"]
    assert entry["runs"] == 0 and entry["failed_runs"] == 2 and "cannot be reached" in entry["errors"][0]
