"""The gate in front of every route: the API key, the concurrency limit, the body size, and one
metrics record per request whatever its outcome. Pure ASGI, so a refusal costs no routing, no body
and no thread."""

from __future__ import annotations

import hmac
import time

from starlette.exceptions import HTTPException

from mlx_clip.serve.error_shapes import error_response
from mlx_clip.serve.server_metrics import ServerMetrics
from mlx_clip.serve.service import ServeSettings

# Answered without an API key: /health, and the web page's static files (no data in them; the page
# asks for the key once it has loaded, and sends it on every API call).
OPEN_ROUTES = ("/health", "/", "/ui/app.js", "/ui/style.css")
UNLIMITED_ROUTES = OPEN_ROUTES + ("/metrics",)  # never refused for load


class BodyTooLarge(HTTPException):
    """Raised from the request stream itself, so a body without Content-Length is cut off too.
    An HTTPException, because FastAPI turns any other error while reading a body into a 400."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds the limit of {limit / 2 ** 20:g} MB (--max-body-mb)")


class Gate:
    """401 without the key, a fast 429 past the concurrency limit, 413 for a body over the limit
    (from Content-Length before reading it, else while it streams); each in the shape of the route
    asked (OpenAI's on OpenAI's route)."""

    def __init__(self, app, *, settings: ServeSettings, metrics: ServerMetrics):
        self.app, self.settings, self.metrics = app, settings, metrics
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, started = scope["path"], time.perf_counter()
        status = 500

        async def tracked_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        counted = path not in UNLIMITED_ROUTES
        try:
            refusal = self._refusal(scope, path)
            if refusal is not None:
                await error_response(path, *refusal)(scope, receive, tracked_send)
                return
            if counted:
                self.in_flight += 1
                self.metrics.in_flight.set(self.in_flight)
            try:
                await self.app(scope, self._limited(receive), tracked_send)
            finally:
                if counted:
                    self.in_flight -= 1
                    self.metrics.in_flight.set(self.in_flight)
        finally:
            self.metrics.record(self.metrics.route(path), status, time.perf_counter() - started)

    def _refusal(self, scope, path: str) -> tuple[int, str, str] | None:
        headers = dict(scope["headers"])
        key = self.settings.api_key
        if key and path not in OPEN_ROUTES:
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return 401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer <key>'"
        limits = self.settings.limits
        if path not in UNLIMITED_ROUTES and self.in_flight >= limits.max_concurrent_requests:
            return 429, "too_many_requests", (f"{limits.max_concurrent_requests} requests already in flight "
                                              "(--max-concurrent-requests); retry later")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
            return 413, "payload_too_large", BodyTooLarge(limits.max_body_bytes).detail
        return None

    def _limited(self, receive):
        limit, received = self.settings.limits.max_body_bytes, 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        return limited_receive
