"""The HTTP API: `create_app(settings)` -> a FastAPI app serving one model.

Routes: `/v1/embed/images`, `/v1/embed/texts`, `/v1/embeddings` (OpenAI's shape), `/v1/classify`,
`/v1/search`, `/v1/thumbnails/{row}`, `/health`, `/info`, `/metrics`, and the web page (`/` and its
two static files, `page.py`) unless `--no-ui`. Errors are `{"error": ..., "type": ...}`, and OpenAI's
shape on OpenAI's route (`errors.py`). The server reads no file and fetches no URL that a request
names: a thumbnail is asked for by its row in the index (`thumbnails.py`).

The event loop only moves bytes: every route hands its CPU work (parsing, base64, decoding,
tokenizing, classifier arithmetic, search, encoding the answer) to the service's CPU pool or its
engine thread, so `/health` and `/metrics` answer at once whatever the other requests cost.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from mlx_clip.serve.bodies import (ClassifyJSONRequest, ImagesJSONRequest, OpenAIEmbeddingsRequest, SearchJSONRequest,
                                   TextsRequest, check_length, form_texts, json_schema_doc, multipart_doc, openai_inputs,
                                   parse, read_body, read_json, uploaded)
from mlx_clip.serve.error_shapes import HTTP_KINDS, ApiError, describe_errors, error_response
from mlx_clip.serve.gate import Gate
from mlx_clip.serve.inputs import check_count, check_labels, check_text, check_texts, is_image_uri
from mlx_clip.serve.server_metrics import ServerMetrics
from mlx_clip.serve.service import DEFAULT_CLASSIFY_TEMPLATES, ModelService, ServeSettings
from mlx_clip.version import __version__


def _json_bytes(payload: dict) -> bytes:
    """Starlette's JSONResponse encoding; float32 arrays become lists of floats."""
    return json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":"),
                      default=lambda a: np.asarray(a, dtype=np.float32).tolist()).encode("utf-8")


def create_app(settings: ServeSettings, *, on_load_failure: Callable[[str], None] | None = None) -> FastAPI:
    metrics = ServerMetrics()
    service = ModelService(settings, metrics)
    limits = settings.limits
    cpu = service.cpu

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
        return error_response(request.url.path, err.status, err.kind, err.message)

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        return error_response(request.url.path, err.status_code, HTTP_KINDS.get(err.status_code, "http_error"),
                              str(err.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, err: RequestValidationError):
        return error_response(request.url.path, 422, "invalid_request", describe_errors(err.errors()))

    @app.exception_handler(Exception)
    async def internal_error(request, err: Exception):
        return error_response(request.url.path, 500, "internal_error", f"{type(err).__name__}: {err}")

    def require_ready() -> ModelService:
        if not service.ready:
            state = f"failed to load: {service.error}" if service.error else "the model is still loading"
            raise ApiError(503, "unavailable", state)
        return service

    async def json_answer(payload: dict) -> Response:
        return Response(await cpu(_json_bytes, payload), media_type="application/json")

    if settings.ui:
        from mlx_clip.serve.page import add_page

        add_page(app)

    @app.get("/health", summary="200 when the model is loaded and serving, 503 otherwise")
    async def health():
        if service.ready:
            return {"status": "ok"}
        if service.error:
            return error_response("/health", 503, "unavailable", f"failed to load: {service.error}")
        return error_response("/health", 503, "loading", "the model is still loading")

    @app.get("/info", summary="Model, engine, dimensions and limits")
    async def info():
        return {"version": __version__, **service.info()}

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.post("/v1/embed/texts", summary="Texts -> L2-normalised embeddings, in order",
              openapi_extra=json_schema_doc(TextsRequest))
    async def embed_texts(request: Request):
        svc = require_ready()
        texts = (await read_json(request, TextsRequest, limits, cpu)).texts
        check_count(texts, "texts", limits.max_items)
        embeds, _ = await svc.embed_texts(check_texts(texts, "texts", limits))
        return await json_answer({"embeddings": embeds, "model": settings.model})

    @app.post("/v1/embed/images", summary="Images (multipart `files`, or JSON base64 `images`) -> embeddings",
              openapi_extra=multipart_doc({"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                                          ImagesJSONRequest))
    async def embed_images(request: Request):
        svc = require_ready()
        kind, body = await read_body(request, limits.max_items, limits, cpu)
        if kind == "multipart":
            items = await uploaded(body, "files")
        else:
            images = (await cpu(parse, ImagesJSONRequest, body, limits)).images
            items = [(f"images[{i}]", value) for i, value in enumerate(images)]  # base64, decoded off the loop
        check_count(items, "files" if kind == "multipart" else "images", limits.max_items)
        return await json_answer({"embeddings": await svc.embed_images(items), "model": settings.model})

    @app.post("/v1/embeddings", summary="OpenAI-compatible embeddings (texts, or data:image/...;base64, URIs)",
              openapi_extra=json_schema_doc(OpenAIEmbeddingsRequest))
    async def openai_embeddings(request: Request):
        svc = require_ready()
        body = await read_json(request, OpenAIEmbeddingsRequest, limits, cpu)
        inputs = openai_inputs(body.input)
        check_count(inputs, "input", limits.max_items)
        dim = svc.clip.config.projection_dim
        if body.dimensions is not None and body.dimensions != dim:
            raise ApiError(422, "invalid_request", f"dimensions: this model's embeddings have {dim} dimensions and "
                           f"are not shortened; got {body.dimensions} (send {dim}, or leave dimensions out)")
        image_at = [i for i, v in enumerate(inputs) if is_image_uri(v)]
        text_at = [i for i, v in enumerate(inputs) if not is_image_uri(v)]
        for i in text_at:
            check_text(inputs[i], f"input[{i}]", limits)
        out = np.zeros((len(inputs), dim), np.float32)
        tokens = 0
        if text_at:
            out[text_at], tokens = await svc.embed_texts([inputs[i] for i in text_at])
        if image_at:
            out[image_at] = await svc.embed_images([(f"input[{i}]", inputs[i]) for i in image_at])
        if body.encoding_format == "base64":
            vectors = [base64.b64encode(row.astype("<f4").tobytes()).decode() for row in out]
        else:
            vectors = list(out)
        return await json_answer({"object": "list", "model": body.model or settings.model,
                                  "data": [{"object": "embedding", "index": i, "embedding": v}
                                           for i, v in enumerate(vectors)],
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @app.post("/v1/classify", summary="An image and candidate labels -> a probability per label",
              openapi_extra=multipart_doc({"file": {"type": "string", "format": "binary"},
                                           "labels": {"type": "array", "items": {"type": "string"},
                                                      "description": "One field per label, or one field holding "
                                                                     "a JSON array of strings"},
                                           "templates": {"type": "array", "items": {"type": "string"}}},
                                          ClassifyJSONRequest))
    async def classify(request: Request):
        svc = require_ready()
        kind, body = await read_body(request, 1, limits, cpu)
        if kind == "multipart":
            files = await uploaded(body, "file")
            if len(files) != 1:
                raise ApiError(422, "invalid_request", f"file: send exactly one image, got {len(files)}")
            image = files[0]
            labels = await form_texts(body, "labels", limits, cpu)
            templates = await form_texts(body, "templates", limits, cpu) or None
        else:
            req = await cpu(parse, ClassifyJSONRequest, body, limits)
            image, labels, templates = ("image", req.image), req.labels, req.templates
        labels, templates = check_labels(labels, templates, limits, DEFAULT_CLASSIFY_TEMPLATES)
        return {**await svc.classify(image, labels, templates), "model": settings.model}

    @app.post("/v1/search", summary="A text or image query -> the k nearest indexed images",
              openapi_extra=multipart_doc({"file": {"type": "string", "format": "binary"},
                                           "text": {"type": "string"}, "k": {"type": "integer"}}, SearchJSONRequest))
    async def search(request: Request):
        svc = require_ready()
        svc.require_index()  # before reading or embedding a query there is nothing to search with
        kind, body = await read_body(request, 1, limits, cpu)
        if kind == "multipart":
            files = await uploaded(body, "file")
            check_length(files, "file", 1)
            fields = {"text": body.get("text"), "k": body.get("k", 10), "image": None}
            req = parse(SearchJSONRequest, {k: v for k, v in fields.items() if v is not None}, limits)
            image = files[0] if files else None
        else:
            req = await cpu(parse, SearchJSONRequest, body, limits)
            image = ("image", req.image) if req.image is not None else None
        if (req.text is None) == (image is None):
            raise ApiError(422, "invalid_request", "send exactly one query: a text or an image")
        if req.k > limits.max_k:
            raise ApiError(413, "too_many_items", f"k: {req.k} exceeds the limit of {limits.max_k}")
        if image is not None:
            query = (await svc.embed_images([image]))[0]
        else:
            query = (await svc.embed_texts([check_text(req.text, "text", limits)]))[0][0]
        return {"results": await svc.search(query, req.k), "model": settings.model}

    @app.get("/v1/thumbnails/{row}", summary="A search result's image, at most 256 pixels a side (JPEG)",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
    async def thumbnail(request: Request, row: int = Path(description="The `row` of a /v1/search result")):
        svc = require_ready()
        svc.require_index()
        data, etag = await cpu(svc.thumbnails.get, row)
        cache = {"ETag": etag, "Cache-Control": "private, max-age=3600"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=cache)
        return Response(data, media_type="image/jpeg", headers=cache)

    return app
