"""Prometheus metrics of a worker (``GET /metrics``), named like vLLM's so existing dashboards apply.

Gauges (running / waiting requests, KV-cache usage) are read from the engine at scrape time; counters and
histograms are fed as requests finish, from the engine's per-request metrics.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from fastllava.engine import RequestMetrics

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)


class _EngineGauges:
    """A custom collector: engine state at scrape time."""

    def __init__(self, server) -> None:
        self.server = server

    def collect(self):
        m = self.server.backend.engine_metrics()
        model = self.server.backend.model_name
        values = {
            "fastllava:num_requests_running": ("Requests in the engine's running batch", m and m.num_running),
            "fastllava:num_requests_waiting": ("Requests queued in the engine", m and m.num_waiting),
            "fastllava:kv_cache_usage_perc": ("Fraction of KV-cache blocks in use (0-1)", m and m.kv_usage),
            "fastllava:kv_cache_blocks_used": ("KV-cache blocks held by requests", m and m.kv_blocks_used),
            "fastllava:num_requests_in_flight": ("HTTP generation requests being served", self.server.in_flight),
            "fastllava:image_pixels_in_flight": (
                "Image pixels being decoded and preprocessed (capped by --max-pixels-in-flight)",
                self.server.backend.pixels.in_use,
            ),
        }
        for name, (doc, v) in values.items():
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([model], float(v or 0))
            yield g
        c = CounterMetricFamily(
            "fastllava:request_aborted", "Requests aborted (client gone, drain)", labels=["model_name"]
        )
        c.add_metric([model], float(m.num_aborted if m else 0))
        yield c


class WorkerMetrics:
    """The worker's registry: engine gauges plus token counters and latency histograms."""

    def __init__(self, server) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineGauges(server))
        labels = ["model_name"]
        self.model = server.backend.model_name
        r = self.registry
        self.prompt_tokens = Counter(
            "fastllava:prompt_tokens", "Prompt tokens (image tokens included)", labels, registry=r
        )
        self.generation_tokens = Counter("fastllava:generation_tokens", "Generated tokens", labels, registry=r)
        self.requests = Counter(
            "fastllava:request_success", "Finished requests by finish reason", [*labels, "finished_reason"], registry=r
        )
        self.errors = Counter(
            "fastllava:request_errors", "Requests answered with an error", [*labels, "status"], registry=r
        )
        self.ttft = Histogram(
            "fastllava:time_to_first_token_seconds", "Time to first token", labels, buckets=_TTFT_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "fastllava:inter_token_latency_seconds", "Time between tokens", labels, buckets=_ITL_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "fastllava:e2e_request_latency_seconds", "Arrival to finish", labels, buckets=_E2E_BUCKETS, registry=r
        )

    def on_finished(self, prompt_tokens: int, completion_tokens: int, reason: str | None, m: RequestMetrics | None):
        self.prompt_tokens.labels(self.model).inc(prompt_tokens)
        self.generation_tokens.labels(self.model).inc(completion_tokens)
        self.requests.labels(self.model, reason or "unknown").inc()
        if m is None:
            return
        if m.ttft is not None:
            self.ttft.labels(self.model).observe(m.ttft)
        for dt in m.inter_token_latencies:
            self.itl.labels(self.model).observe(dt)
        if m.finished_time is not None:
            self.e2e.labels(self.model).observe(m.finished_time - m.arrival_time)

    def on_error(self, status: int) -> None:
        self.errors.labels(self.model, str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
