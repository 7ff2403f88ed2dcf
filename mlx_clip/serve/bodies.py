"""Reading a request's body: JSON (each route's pydantic model) or multipart, bounded before parsed.

Parsing runs in the server's CPU pool, never on the event loop. A JSON body's shape is measured
before `json.loads` builds it: the C parser holds the GIL for the whole parse (a second for 16 MB
of small numbers, and pydantic then a minute to list one error per number), while the measuring is
numpy, which lets go of the GIL. A body nested deeper, or holding more values, than any request to
this server can is refused unparsed.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from mlx_clip.serve.error_shapes import ApiError, describe_errors
from mlx_clip.serve.limits import Limits

# No request to this server nests deeper than 2 ({"texts": [...]}); a body nested past this is
# refused before it is parsed (json.loads itself gives up near 1000 levels, with RecursionError).
MAX_JSON_DEPTH = 32
_SCAN_CHUNK = 1 << 20  # bytes measured per numpy pass: bounds the scan's memory to a few MB
_QUOTE, _COMMA = ord('"'), ord(",")
_OPEN, _CLOSE = (ord("["), ord("{")), (ord("]"), ord("}"))
# The list fields a body may hold, and which limit bounds each (checked before validation).
_LIST_LIMITS = {"texts": "max_items", "images": "max_items", "input": "max_items", "labels": "max_labels",
                "templates": "max_labels"}


# --- the bodies -----------------------------------------------------------------------------------
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
    """OpenAI's `POST /v1/embeddings` body; images as data URIs (Infinity's convention). Unknown
    fields are ignored, as OpenAI's clients send fields other servers do not know."""
    model: str | None = None
    input: Any = Field(description="A string or a list of strings (texts, or data:image/...;base64, URIs).")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


def json_schema_doc(model: type[BaseModel]) -> dict:
    """OpenAPI for a route that reads its JSON body itself (so /docs still shows the body)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def multipart_doc(fields: dict, model: type[BaseModel]) -> dict:
    """OpenAPI for a route that reads multipart or JSON itself (so /docs shows both)."""
    return {"requestBody": {"content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": fields}},
        "application/json": {"schema": model.model_json_schema()}}}}


# --- JSON, measured then parsed (CPU pool) ---------------------------------------------------------
def json_shape(raw: bytes) -> tuple[int, int]:
    """(values, depth) of a JSON text, unparsed: one more than the commas outside strings (so at
    least its elements and members), and the deepest nesting of `[` and `{` outside strings."""
    # Escaped backslashes first, then escaped quotes: what is left of `"` delimits strings.
    data = np.frombuffer(raw.replace(b"\\\\", b"__").replace(b'\\"', b"__"), np.uint8)
    values, depth, level, parity = 1, 0, 0, 0
    for start in range(0, len(data), _SCAN_CHUNK):
        b = data[start:start + _SCAN_CHUNK]
        inside = np.bitwise_xor.accumulate((b == _QUOTE).view(np.uint8))  # 1 from an opening quote on
        if parity:
            inside ^= 1
        parity = int(inside[-1])
        outside = inside == 0
        values += int(np.count_nonzero((b == _COMMA) & outside))
        opens = ((b == _OPEN[0]) | (b == _OPEN[1])) & outside
        closes = ((b == _CLOSE[0]) | (b == _CLOSE[1])) & outside
        run = np.cumsum(opens.view(np.int8) - closes.view(np.int8), dtype=np.int32) + level
        depth, level = max(depth, int(run.max())), int(run[-1])
    return values, depth


def load_json(raw: bytes | str, limits: Limits, where: str = "body"):
    """A JSON text -> Python objects, refused unparsed when deeper or larger than any request."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    values, depth = json_shape(raw)
    if depth > MAX_JSON_DEPTH:
        raise ApiError(422, "invalid_json", f"{where}: not a request this server reads: JSON nested {depth} levels "
                       f"deep (requests nest at most {MAX_JSON_DEPTH})")
    most = 2 * limits.max_list + 64  # the two longest lists a request holds (labels, templates) and the rest
    if values > most:
        raise ApiError(413, "too_many_items", f"{where}: {values} JSON values or more exceeds the {most} any request "
                       "to this server can hold (lists are limited by --max-items and --max-labels)")
    try:
        return json.loads(raw)
    except RecursionError:
        raise ApiError(422, "invalid_json", f"{where}: not valid JSON: nested too deeply to parse") from None
    except ValueError as err:  # JSONDecodeError, and UnicodeDecodeError for bytes in no UTF encoding
        raise ApiError(422, "invalid_json", f"{where}: not valid JSON: {err}") from None


def parse(model: type[BaseModel], data, limits: Limits) -> BaseModel:
    """`data` validated as `model`; lists over their limit (413) and unknown fields (422) are
    refused before pydantic, which would list one error per item."""
    if isinstance(data, dict):
        for field, limit in _LIST_LIMITS.items():
            items = data.get(field)
            if field in model.model_fields and isinstance(items, list):
                check_length(items, field, getattr(limits, limit))
        if model.model_config.get("extra") == "forbid":
            unknown = [k for k in data if k not in model.model_fields]
            if unknown:
                raise ApiError(422, "invalid_request", f"{unknown[0]}: unknown field; this route reads "
                               f"{', '.join(model.model_fields)}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ApiError(422, "invalid_request",
                       describe_errors(err.errors(include_url=False, include_context=False, include_input=False))
                       ) from None


def check_length(items: list, what: str, limit: int) -> None:
    if len(items) > limit:
        raise ApiError(413, "too_many_items", f"{what}: {len(items)} items exceeds the limit of {limit} per request")


def openai_inputs(value) -> list[str]:
    """OpenAI's `input` as a list of strings. OpenAI also takes token arrays (a list of ints, or of
    lists of ints): refused by name, since ids mean words only to the tokenizer that made them."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    if isinstance(value, list) and value and (_token_ids(value) or all(_token_ids(v) for v in value)):
        raise ApiError(422, "invalid_request", "input: token arrays are not accepted: token ids mean words only to "
                       "the tokenizer that made them, and this model has its own; send the texts as strings")
    raise ApiError(422, "invalid_request", f"input: expected a string or a list of strings, got {_kind(value)}")


def _token_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(type(v) is int for v in value)


def _kind(value) -> str:
    if isinstance(value, list):
        kinds = sorted({type(v).__name__ for v in value})
        return f"a list of {', '.join(kinds)}"
    return type(value).__name__


# --- reading a request ---------------------------------------------------------------------------------
def _content_kind(request) -> str:
    return request.headers.get("content-type", "application/json").split(";")[0].strip().lower()


async def read_body(request, max_files: int, limits: Limits, cpu) -> tuple[str, Any]:
    """("multipart", form) or ("json", object) from a request that may be either; `cpu(fn, *args)`
    runs the JSON parse off the event loop."""
    kind = _content_kind(request)
    if kind == "multipart/form-data":
        fields = 2 * limits.max_list + 16  # labels and templates, one field each, and the rest
        try:
            return "multipart", await request.form(max_files=max_files + 1, max_fields=fields)
        except HTTPException as err:
            detail = str(err.detail)
            if "Too many files" in detail:
                raise ApiError(413, "too_many_items", f"more than {max_files} files in one request") from None
            if "Too many fields" in detail:
                raise ApiError(413, "too_many_items", f"more than {fields} fields in one request") from None
            if "maximum size" in detail:
                raise ApiError(413, "payload_too_large", f"a multipart field: {detail}") from None
            raise ApiError(422, "invalid_request", f"unreadable multipart body: {detail}") from None
    if kind != "application/json":
        raise ApiError(415, "unsupported_media_type", f"content-type {kind!r}: send application/json or "
                       "multipart/form-data")
    return "json", await cpu(load_json, await request.body(), limits)


async def read_json(request, model: type[BaseModel], limits: Limits, cpu) -> BaseModel:
    """A JSON-only route's body, parsed and validated off the event loop."""
    kind = _content_kind(request)
    if kind != "application/json":
        raise ApiError(415, "unsupported_media_type", f"content-type {kind!r}: send application/json")
    raw = await request.body()
    return await cpu(lambda: parse(model, load_json(raw, limits), limits))


async def uploaded(form, field: str) -> list[tuple[str, bytes]]:
    files = []
    for i, item in enumerate(form.getlist(field)):
        if isinstance(item, str):
            raise ApiError(422, "invalid_request", f"{field}[{i}]: expected a file upload, got a text field")
        files.append((item.filename or f"{field}[{i}]", await item.read()))
    return files


async def form_texts(form, field: str, limits: Limits, cpu) -> list[str]:
    """A multipart list of texts: one field per item, or one field holding a JSON array of strings
    (`labels='["a cat", "a dog"]'`, as clients that send one value per name do)."""
    values = form.getlist(field)
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise ApiError(422, "invalid_request", f"{field}[{i}]: expected text, got a file upload")
    if len(values) == 1 and values[0].lstrip().startswith("["):
        items = await cpu(load_json, values[0], limits, field)
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise ApiError(422, "invalid_request", f"{field}: a field starting with '[' is read as a JSON array of "
                           f"strings; got {_kind(items)}")
        return items
    return list(values)
