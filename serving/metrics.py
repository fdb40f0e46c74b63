"""Prometheus metrics of ``lrdeploy serve`` (prometheus-client), one registry per server.

- ``lrdeploy_requests_total{model, endpoint, status}``: every answered request, by HTTP status;
- ``lrdeploy_request_seconds{model}``: infer latency, request read to response ready (histogram);
- ``lrdeploy_queue_seconds{model}``: time a request waited for an instance (histogram);
- ``lrdeploy_batch_rows{model}`` / ``lrdeploy_batch_requests{model}``: rows and requests per executed batch;
- ``lrdeploy_inflight_requests{model}``: infer requests being handled now.

A registry of its own (not the process-global default) lets several servers live in one process (tests) and
keeps the Python collector's gauges out of a model server's page unless asked.
"""

from __future__ import annotations

from typing import Any

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    """The server's counters and histograms; ``render()`` is the ``/metrics`` page."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("lrdeploy_requests", "Requests answered, by model, endpoint and HTTP status",
                                ["model", "endpoint", "status"], registry=self.registry)
        self.latency = Histogram("lrdeploy_request_seconds", "Infer latency (request read to response ready)",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue = Histogram("lrdeploy_queue_seconds", "Time a request waited for a model instance",
                               ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_rows = Histogram("lrdeploy_batch_rows", "Rows (batch size) per executed batch", ["model"],
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_requests = Histogram("lrdeploy_batch_requests", "Requests merged into one executed batch",
                                        ["model"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.inflight = Gauge("lrdeploy_inflight_requests", "Infer requests being handled", ["model"],
                              registry=self.registry)

    def observer(self, model: str) -> Any:
        """The batcher's callback for ``model``: queue time, batch rows and requests per batch."""
        queue, rows, reqs = (self.queue.labels(model), self.batch_rows.labels(model),
                             self.batch_requests.labels(model))
        sinks = {"queue_seconds": queue.observe, "batch_rows": rows.observe, "batch_requests": reqs.observe}

        def observe(what: str, value: float) -> None:
            sinks[what](value)

        return observe

    def count(self, model: str, endpoint: str, status: int) -> None:
        self.requests.labels(model, endpoint, str(status)).inc()

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
