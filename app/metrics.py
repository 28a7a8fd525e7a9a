"""Prometheus metrics, one registry per app (so several apps in one process, as in tests, stay apart)."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rmt_service.store import JOB_STATUSES, Store


# Label values come from this set only: a client inventing methods (or paths: those are "unmatched") cannot
# grow the registry.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class _JobsCollector:
    """Jobs by status from the database at scrape time (the records are the truth, not this process).

    One read of the five-row job_counts table, kept by the job state machine: a scrape costs the same
    with ten jobs or ten million.
    """

    def __init__(self, store: Store):
        self.store = store

    def collect(self):
        family = GaugeMetricFamily("rmt_jobs", "Tuning jobs in the records database, by status.", labels=["status"])
        try:
            counts = self.store.job_counts()
        except Exception:  # database down: the scrape still answers (without this family's values)
            counts = {}
        for status in JOB_STATUSES:
            if status in counts:
                family.add_metric([status], counts[status])
        yield family


class Metrics:
    def __init__(self, store: Store):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("rmt_http_requests", "HTTP requests.", ["method", "route", "status"], registry=r)
        self.latency = Histogram("rmt_http_request_duration_seconds", "HTTP request latency.", ["route"],
                                 registry=r, buckets=(.002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10, 30))
        self.classified = Counter("rmt_classified_images", "Images classified.", registry=r)
        self.batch_size = Histogram("rmt_classify_batch_size", "Images per ONNX Runtime call (micro-batching).",
                                    registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.cache_events = Counter("rmt_classifier_cache_events", "Classifier cache hits, misses, evictions.",
                                    ["event"], registry=r)
        self.cache_size = Gauge("rmt_classifier_cache_size", "ONNX Runtime sessions loaded.", registry=r)
        self.jobs_created = Counter("rmt_jobs_created", "Tuning jobs accepted.", registry=r)
        r.register(_JobsCollector(store))


class MetricsMiddleware:
    """Counts and times every request by its route template (not its path: ids would explode cardinality)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
            self.metrics.requests.labels(method, template, str(status["code"])).inc()
            self.metrics.latency.labels(template).observe(time.perf_counter() - start)
