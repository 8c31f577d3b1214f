"""Prometheus metrics of a server: engine gauges read at scrape time, latency histograms.

Each server has its own registry (several servers may live in one process, as in tests).
"""

from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from fastdecode.serving.async_engine import AsyncEngine

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# stats key -> (metric name, help); gauges, then counters (exposed with a _total suffix).
_GAUGES = {
    "running": ("fastdecode_requests_running", "Requests in the running batch."),
    "waiting": ("fastdecode_requests_waiting", "Requests waiting for admission."),
    "tokens_per_s": ("fastdecode_generation_tokens_per_second",
                     "Generated tokens per second over the last 10 s."),
    "prefix_cache_hit_rate": ("fastdecode_prefix_cache_hit_rate",
                              "Fraction of admitted prompt tokens found in the prefix cache."),
}
_COUNTERS = {
    "generated_tokens": ("fastdecode_generation_tokens", "Tokens generated."),
    "preemptions": ("fastdecode_preemptions", "Requests preempted for lack of KV blocks."),
    "rejected": ("fastdecode_requests_rejected", "Requests refused because the queue was full."),
    "timeouts": ("fastdecode_requests_timed_out", "Requests aborted at their timeout."),
    "prefix_cache_hits": ("fastdecode_prefix_cache_hit_tokens",
                          "Prompt tokens found in the prefix cache."),
}


class _EngineCollector:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats
        for key, (name, doc) in _GAUGES.items():
            yield GaugeMetricFamily(name, doc, value=stats[key])
        used = 1.0 - stats["free_blocks"] / stats["num_blocks"]
        yield GaugeMetricFamily("fastdecode_kv_cache_usage",
                                "Fraction of KV blocks held by requests.", value=used)
        for key, (name, doc) in _COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=stats[key])


class ServerMetrics:
    """The registry of one server, and the observations its request handlers make."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.ttft = Histogram("fastdecode_time_to_first_token_seconds",
                              "From the request's arrival to its first token.",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("fastdecode_inter_token_latency_seconds",
                             "Between consecutive tokens of a request.",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.finished = Counter("fastdecode_requests_finished",
                                "Requests finished, by finish reason.", ["finish_reason"],
                                registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
