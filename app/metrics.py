"""Prometheus metrics, one registry per app (so several apps in one process, as in tests, stay apart)."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rmt_core.store import JOB_STATUSES, ClassifierStore


class _JobsCollector:
    """Jobs by status, counted from the store at scrape time (the store is the truth, not this process)."""

    def __init__(self, store: ClassifierStore):
        self.store = store

    def collect(self):
        family = GaugeMetricFamily("rmt_jobs", "Tuning jobs in the data directory, by status.", labels=["status"])
        counts = dict.fromkeys(JOB_STATUSES, 0)
        for job in self.store.iter_jobs():
            counts[job.status] = counts.get(job.status, 0) + 1
        for status, count in counts.items():
            family.add_metric([status], count)
        yield family


class Metrics:
    def __init__(self, store: ClassifierStore):
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
            self.metrics.requests.labels(scope["method"], template, str(status["code"])).inc()
            self.metrics.latency.labels(template).observe(time.perf_counter() - start)
