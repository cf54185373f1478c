"""Prometheus metrics of the inference server, named as vLLM and Triton users expect
(with a `vigil_` prefix) and labelled by model and version.

Each server owns its registry, so several servers can live in one process (tests).
Engine gauges (running, waiting, batch size, KV cache use) are read from the engines
at scrape time instead of being pushed from the engine threads.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
LABELS = ("model", "version")


class ServerMetrics:
    def __init__(self, router):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("vigil_requests", "Requests by method, final status and the front they came "
                                "through (protocol: grpc or http)", LABELS + ("method", "status", "protocol"), registry=r)
        self.e2e = Histogram("vigil_e2e_request_latency_seconds", "End-to-end request latency",
                             LABELS, buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("vigil_time_to_first_token_seconds", "Time to first token",
                              LABELS, buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("vigil_inter_token_latency_seconds", "Time between two tokens of a request",
                             LABELS, buckets=TOKEN_BUCKETS, registry=r)
        self.queue = Histogram("vigil_request_queue_time_seconds", "Time spent waiting for a KV slot",
                               LABELS, buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("vigil_prompt_tokens", "Prompt tokens processed", LABELS, registry=r)
        self.generation_tokens = Counter("vigil_generation_tokens", "Tokens generated", LABELS, registry=r)
        self.shadow_skipped = Counter("vigil_shadow_skipped", "Shadow copies not run: the shadow version's queue "
                                      "was full", LABELS, registry=r)
        r.register(EngineCollector(router))


class EngineCollector:
    def __init__(self, router):
        self.router = router

    def collect(self):
        families = {
            "running": GaugeMetricFamily("vigil_num_requests_running", "Requests in the running batch", labels=LABELS),
            "waiting": GaugeMetricFamily("vigil_num_requests_waiting", "Requests waiting for a KV slot", labels=LABELS),
            "batch": GaugeMetricFamily("vigil_batch_size", "Sequences in the last decode step", labels=LABELS),
            "kv": GaugeMetricFamily("vigil_kv_cache_usage_ratio", "Share of the KV pool's tokens in use", labels=LABELS),
        }
        for mv in self.router.all():
            s, labels = mv.engine.stats, [mv.model, mv.version]
            families["running"].add_metric(labels, s.running)
            families["waiting"].add_metric(labels, s.waiting)
            families["batch"].add_metric(labels, s.batch_size)
            families["kv"].add_metric(labels, s.kv_tokens_used / max(1, s.kv_tokens_total))
        yield from families.values()
