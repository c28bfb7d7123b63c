"""Prometheus metrics (text exposition format 0.0.4, written by hand: no client library needed)
and the periodic throughput log line.

Server-side values (requests, TTFT, inter-token latency, end-to-end latency) are recorded by the
routes on the event loop; engine values (tokens, queues, KV cache, prefix cache) are read from
``AsyncEngine.metrics_snapshot`` at scrape time.
"""
from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import Counter

from mistralpy.engine.async_engine import AsyncEngine

log = logging.getLogger(__name__)

PREFIX = "mistralpy"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip((*map(repr, self.buckets), "+Inf"), self.counts):
            cumulative += n
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {cumulative}')
        lines += [f"{self.name}_sum {self.sum!r}", f"{self.name}_count {self.count}"]
        return lines


class ServerMetrics:
    """Everything /metrics shows. Only touched from the event loop thread, so no locks."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.requests: Counter[tuple[str, int]] = Counter()   # (endpoint, status) -> count
        self.finish_reasons: Counter[str] = Counter()
        self.aborted_requests = 0                              # client disconnects
        self.in_flight = 0
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Time from request arrival to its "
                              "first generated token.", TTFT_BUCKETS)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "Time between two tokens of one choice.",
                             ITL_BUCKETS)
        self.e2e = Histogram(f"{PREFIX}_request_latency_seconds", "Time from request arrival to its last token.",
                             E2E_BUCKETS)

    def request_done(self, endpoint: str, status: int) -> None:
        self.requests[(endpoint, status)] += 1

    def render(self, engine: AsyncEngine) -> str:
        snap = engine.metrics_snapshot()
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, value: float, labels: str = "") -> None:
            full = f"{PREFIX}_{name}"
            out.extend([f"# HELP {full} {help_text}", f"# TYPE {full} {kind}", f"{full}{labels} {value}"])

        out += [f"# HELP {PREFIX}_requests_total HTTP requests answered, by endpoint and status.",
                f"# TYPE {PREFIX}_requests_total counter"]
        for (endpoint, status), n in sorted(self.requests.items()):
            out.append(f'{PREFIX}_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
        out += [f"# HELP {PREFIX}_request_finish_total Finished choices by finish reason.",
                f"# TYPE {PREFIX}_request_finish_total counter"]
        for reason, n in sorted(self.finish_reasons.items()):
            out.append(f'{PREFIX}_request_finish_total{{reason="{reason}"}} {n}')
        metric("requests_aborted_total", "counter", "Requests aborted because the client went away.",
               self.aborted_requests)
        metric("requests_in_flight", "gauge", "HTTP generation requests being served.", self.in_flight)
        metric("prompt_tokens_total", "counter", "Prompt tokens computed (prefix-cache hits excluded).",
               snap["prompt_tokens"])
        metric("generation_tokens_total", "counter", "Tokens generated.", snap["generation_tokens"])
        metric("engine_steps_total", "counter", "Engine steps run.", snap["steps"])
        metric("num_requests_running", "gauge", "Sequences in the running batch.", snap["running"])
        metric("num_requests_waiting", "gauge", "Sequences waiting for admission.", snap["waiting"])
        metric("num_preemptions_total", "counter", "Sequences preempted for lack of KV blocks.",
               snap["preemptions"])
        metric("kv_cache_blocks_total", "gauge", "KV cache blocks in the pool.", snap["kv_blocks_total"])
        metric("kv_cache_blocks_free", "gauge", "KV cache blocks not held by any sequence.",
               snap["kv_blocks_free"])
        metric("kv_cache_usage_ratio", "gauge", "Fraction of KV cache blocks in use.", snap["kv_usage"])
        metric("prefix_cache_queries_total", "counter", "KV blocks looked up in the prefix cache.",
               snap["prefix_queries"])
        metric("prefix_cache_hits_total", "counter", "KV blocks found in the prefix cache.", snap["prefix_hits"])
        rate = snap["prefix_hits"] / snap["prefix_queries"] if snap["prefix_queries"] else 0.0
        metric("prefix_cache_hit_rate", "gauge", "prefix_cache_hits_total / prefix_cache_queries_total.", rate)
        metric("engine_healthy", "gauge", "1 while the engine loop runs.", 0 if engine.dead_error else 1)
        for h in (self.ttft, self.itl, self.e2e):
            out += h.render()
        return "\n".join(out) + "\n"


async def log_throughput(engine: AsyncEngine, interval_s: float) -> None:
    """Every ``interval_s`` while tokens flow, log one line: prompt and generation tok/s, queues, KV usage."""
    last = engine.metrics_snapshot()
    last_t = time.monotonic()
    while True:
        await asyncio.sleep(interval_s)
        snap, now = engine.metrics_snapshot(), time.monotonic()
        dp = snap["prompt_tokens"] - last["prompt_tokens"]
        dg = snap["generation_tokens"] - last["generation_tokens"]
        if dp or dg or snap["running"] or snap["waiting"]:
            dt = now - last_t
            log.info("throughput: prompt %.1f tok/s, generation %.1f tok/s, running %d, waiting %d, "
                     "KV cache %.1f%%", dp / dt, dg / dt, snap["running"], snap["waiting"], 100 * snap["kv_usage"])
        last, last_t = snap, now
