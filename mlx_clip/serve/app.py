"""The HTTP API: `create_app(settings)` -> a FastAPI app serving one model.

Routes: `/v1/embed/images`, `/v1/embed/texts`, `/v1/embeddings` (OpenAI's shape), `/v1/classify`,
`/v1/search`, `/health`, `/info`, `/metrics`. Every error body is `{"error": ..., "type": ...}`.
The server reads no file and fetches no URL that a request names.
"""

from __future__ import annotations

import base64
import hmac
import json
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from mlx_clip.serve.inputs import ApiError, check_count, decode_base64_image, is_image_uri
from mlx_clip.serve.metrics import ServerMetrics
from mlx_clip.serve.service import ModelService, ServeSettings
from mlx_clip.version import __version__

OPEN_ROUTES = ("/health",)  # answered without an API key, and never refused for load
UNLIMITED_ROUTES = ("/health", "/metrics")


class BodyTooLarge(HTTPException):
    """Raised from the request stream itself, so a body without Content-Length is cut off too.
    An HTTPException, because FastAPI turns any other error while reading a body into a 400."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds the limit of {limit / 2 ** 20:g} MB (--max-body-mb)")


# --- request bodies ---------------------------------------------------------------------------
class TextsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str] = Field(description="Texts to embed, in order.")


class ImagesJSONRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(description="Base64 images or data:image/...;base64, URIs.")


class ClassifyJSONRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str = Field(description="A base64 image or data URI.")
    labels: list[str]
    templates: list[str] | None = Field(None, description="Prompt templates with one {}; default 'a photo of a {}.'")


class SearchJSONRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    image: str | None = Field(None, description="A base64 image or data URI.")
    k: int = Field(10, ge=1)


class OpenAIEmbeddingsRequest(BaseModel):
    """OpenAI's `POST /v1/embeddings` body; images as data URIs (Infinity's convention)."""
    model: str | None = None
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


def _multipart_doc(fields: dict) -> dict:
    """OpenAPI for a route that reads multipart or JSON itself (so /docs shows both)."""
    return {"requestBody": {"content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": fields}},
        "application/json": {"schema": {"type": "object"}}}}}


# --- the gate: key, concurrency, body size, metrics ---------------------------------------------
class Gate:
    """Pure ASGI middleware in front of every route: 401 without the key, a fast 429 past the
    concurrency limit, 413 for a body over the limit (from Content-Length before reading it, else
    while it streams), and one metrics record per request whatever the outcome."""

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
                await error_response(*refusal)(scope, receive, tracked_send)
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


def error_response(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "type": kind}, status_code=status)


_HTTP_KINDS = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_request",
               429: "too_many_requests", 503: "unavailable"}


def _validation_message(err: RequestValidationError) -> str:
    parts = []
    for e in err.errors()[:3]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


# --- reading requests ---------------------------------------------------------------------------
async def read_body(request: Request, max_files: int) -> tuple[str, dict]:
    """("multipart", form) or ("json", object) from a request that may be either."""
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        try:
            return "multipart", await request.form(max_files=max_files + 1, max_fields=10_000)
        except HTTPException as err:
            if "Too many files" in str(err.detail):
                raise ApiError(413, "too_many_items", f"more than {max_files} files in one request") from None
            raise ApiError(422, "invalid_request", f"unreadable multipart body: {err.detail}") from None
    if kind != "application/json":
        raise ApiError(415, "unsupported_media_type", f"content-type {kind!r}: send application/json or "
                       "multipart/form-data")
    raw = await request.body()
    try:
        return "json", json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(422, "invalid_json", f"body is not valid JSON: {err}") from None


def parse(model: type[BaseModel], data) -> BaseModel:
    try:
        return model.model_validate(data)
    except Exception as err:
        errors = getattr(err, "errors", lambda: [])()
        raise RequestValidationError(errors) from None


async def uploaded(form, field: str) -> list[tuple[str, bytes]]:
    files = []
    for i, item in enumerate(form.getlist(field)):
        if isinstance(item, str):
            raise ApiError(422, "invalid_request", f"{field}[{i}]: expected a file upload, got a text field")
        files.append((item.filename or f"{field}[{i}]", await item.read()))
    return files


def _embedding_rows(embeds: np.ndarray) -> list[list[float]]:
    return np.asarray(embeds, dtype=np.float32).tolist()


# --- the app ------------------------------------------------------------------------------------
def create_app(settings: ServeSettings, *, on_load_failure: Callable[[str], None] | None = None) -> FastAPI:
    metrics = ServerMetrics()
    service = ModelService(settings, metrics)
    limits = settings.limits

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import asyncio

        async def load():
            await service.start()
            if service.error is not None and on_load_failure is not None:
                on_load_failure(service.error)

        loading = asyncio.get_running_loop().create_task(load())
        yield
        loading.cancel()
        await service.stop()

    app = FastAPI(title="mlxclip", version=__version__, lifespan=lifespan,
                  description="CLIP embeddings, zero-shot classification and image search.")
    app.state.service = service
    app.add_middleware(Gate, settings=settings, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        return error_response(err.status, err.kind, err.message)

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        return error_response(err.status_code, _HTTP_KINDS.get(err.status_code, "http_error"), str(err.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, err: RequestValidationError):
        return error_response(422, "invalid_request", _validation_message(err))

    @app.exception_handler(Exception)
    async def internal_error(request, err: Exception):
        return error_response(500, "internal_error", f"{type(err).__name__}: {err}")

    def require_ready() -> ModelService:
        if not service.ready:
            state = f"failed to load: {service.error}" if service.error else "the model is still loading"
            raise ApiError(503, "unavailable", state)
        return service

    @app.get("/health", summary="200 when the model is loaded and serving, 503 otherwise")
    async def health():
        if service.ready:
            return {"status": "ok"}
        if service.error:
            return error_response(503, "unavailable", f"failed to load: {service.error}")
        return error_response(503, "loading", "the model is still loading")

    @app.get("/info", summary="Model, engine, dimensions and limits")
    async def info():
        return {"version": __version__, **service.info()}

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.post("/v1/embed/texts", summary="Texts -> L2-normalised embeddings, in order")
    async def embed_texts(body: TextsRequest):
        svc = require_ready()
        check_count(body.texts, "texts", limits.max_items)
        embeds, _ = await svc.embed_texts(body.texts)
        return {"embeddings": _embedding_rows(embeds), "model": settings.model}

    @app.post("/v1/embed/images", summary="Images (multipart `files`, or JSON base64 `images`) -> embeddings",
              openapi_extra=_multipart_doc({"files": {"type": "array", "items": {"type": "string",
                                                                                 "format": "binary"}}}))
    async def embed_images(request: Request):
        svc = require_ready()
        kind, body = await read_body(request, limits.max_items)
        if kind == "multipart":
            blobs = await uploaded(body, "files")
        else:
            images = parse(ImagesJSONRequest, body).images
            check_count(images, "images", limits.max_items)
            blobs = [(f"images[{i}]", decode_base64_image(v, f"images[{i}]")) for i, v in enumerate(images)]
        check_count(blobs, "files" if kind == "multipart" else "images", limits.max_items)
        return {"embeddings": _embedding_rows(await svc.embed_images(blobs)), "model": settings.model}

    @app.post("/v1/embeddings", summary="OpenAI-compatible embeddings (texts, or data:image/...;base64, URIs)")
    async def openai_embeddings(body: OpenAIEmbeddingsRequest):
        svc = require_ready()
        inputs = [body.input] if isinstance(body.input, str) else body.input
        check_count(inputs, "input", limits.max_items)
        dim = svc.clip.config.projection_dim
        if body.dimensions is not None and body.dimensions != dim:
            raise ApiError(422, "invalid_request", f"dimensions: this model's embeddings have {dim} dimensions, "
                           f"got {body.dimensions}")
        image_at = [i for i, v in enumerate(inputs) if is_image_uri(v)]
        text_at = [i for i, v in enumerate(inputs) if not is_image_uri(v)]
        out = np.zeros((len(inputs), dim), np.float32)
        tokens = 0
        if text_at:
            out[text_at], tokens = await svc.embed_texts([inputs[i] for i in text_at])
        if image_at:
            out[image_at] = await svc.embed_images(
                [(f"input[{i}]", decode_base64_image(inputs[i], f"input[{i}]")) for i in image_at])
        if body.encoding_format == "base64":
            vectors = [base64.b64encode(row.astype("<f4").tobytes()).decode() for row in out]
        else:
            vectors = _embedding_rows(out)
        return {"object": "list", "model": body.model or settings.model,
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/v1/classify", summary="An image and candidate labels -> a probability per label",
              openapi_extra=_multipart_doc({"file": {"type": "string", "format": "binary"},
                                            "labels": {"type": "array", "items": {"type": "string"}},
                                            "templates": {"type": "array", "items": {"type": "string"}}}))
    async def classify(request: Request):
        svc = require_ready()
        kind, body = await read_body(request, 1)
        if kind == "multipart":
            files = await uploaded(body, "file")
            if len(files) != 1:
                raise ApiError(422, "invalid_request", f"file: send exactly one image, got {len(files)}")
            image, labels, templates = files[0], list(body.getlist("labels")), list(body.getlist("templates")) or None
        else:
            req = parse(ClassifyJSONRequest, body)
            image, labels, templates = ("image", decode_base64_image(req.image, "image")), req.labels, req.templates
        check_count(labels, "labels", limits.max_labels)
        if templates is not None:
            check_count(templates, "templates", limits.max_labels)
        if len(set(labels)) != len(labels):
            raise ApiError(422, "invalid_request", "labels: each label must appear once")
        return {**await svc.classify(image, labels, templates), "model": settings.model}

    @app.post("/v1/search", summary="A text or image query -> the k nearest indexed images",
              openapi_extra=_multipart_doc({"file": {"type": "string", "format": "binary"},
                                            "text": {"type": "string"}, "k": {"type": "integer"}}))
    async def search(request: Request):
        svc = require_ready()
        svc.require_index()  # before reading or embedding a query there is nothing to search with
        kind, body = await read_body(request, 1)
        if kind == "multipart":
            files = await uploaded(body, "file")
            fields = {"text": body.get("text"), "k": body.get("k", 10), "image": None}
            req = parse(SearchJSONRequest, {k: v for k, v in fields.items() if v is not None})
            image = files[0] if files else None
        else:
            req = parse(SearchJSONRequest, body)
            image = ("image", decode_base64_image(req.image, "image")) if req.image is not None else None
        if (req.text is None) == (image is None):
            raise ApiError(422, "invalid_request", "send exactly one query: a text or an image")
        if req.k > limits.max_k:
            raise ApiError(413, "too_many_items", f"k: {req.k} exceeds the limit of {limits.max_k}")
        if image is not None:
            query = (await svc.embed_images([image]))[0]
        else:
            query = (await svc.embed_texts([req.text]))[0][0]
        return {"results": await svc.search(query, req.k), "model": settings.model}

    return app
