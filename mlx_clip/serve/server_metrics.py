"""Prometheus metrics for one server, in a registry of its own (several apps can share a process)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ROUTES = ("/v1/embed/images", "/v1/embed/texts", "/v1/embeddings", "/v1/classify", "/v1/search",
          "/v1/thumbnails", "/health", "/info", "/metrics", "/docs", "/openapi.json", "/", "/ui/app.js",
          "/ui/style.css")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mlxclip_requests", "HTTP requests answered", ["route"], registry=r)
        self.failures = Counter("mlxclip_request_failures", "HTTP requests answered with status >= 400",
                                ["route", "status"], registry=r)
        self.latency = Histogram("mlxclip_request_latency_seconds", "Time from request to response",
                                 ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("mlxclip_queue_time_seconds", "Time a job waited for the engine",
                                    ["kind"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("mlxclip_batch_size", "Rows per engine call", ["kind"],
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("mlxclip_queue_depth", "Rows waiting for the engine", ["kind"], registry=r)
        self.in_flight = Gauge("mlxclip_requests_in_flight", "Requests being served", registry=r)

    @staticmethod
    def route(path: str) -> str:
        """The label for `path`: a known route, else `other` (unknown paths must not grow the series)."""
        if path.startswith("/v1/thumbnails/"):  # one series for every row
            return "/v1/thumbnails"
        return path if path in ROUTES else "other"

    def record(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route).inc()
        self.latency.labels(route).observe(seconds)
        if status >= 400:
            self.failures.labels(route, str(status)).inc()

    def observer(self, kind: str):
        """A `MicroBatcher.observe` callback for the `kind` ("image" / "text") queue."""
        def observe(rows: int, waits: list[float], waiting_rows: int) -> None:
            self.batch_size.labels(kind).observe(rows)
            for wait in waits:
                self.queue_time.labels(kind).observe(wait)
            self.queue_depth.labels(kind).set(waiting_rows)
        return observe

    def render(self) -> bytes:
        return generate_latest(self.registry)
