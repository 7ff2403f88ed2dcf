"""Every refusal the server makes, and the two shapes it answers them in.

Our routes answer `{"error": "<one line>", "type": "<kind>"}`. OpenAI's route (`/v1/embeddings`)
answers OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: the official client puts
`error.message` into its exception and shows only the status code without it.
"""

from __future__ import annotations

import re

from fastapi.responses import JSONResponse

OPENAI_ROUTES = frozenset({"/v1/embeddings"})
# The fields of OpenAI's embeddings body: a message about one of them names it as `param`.
OPENAI_PARAMS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})
# Messages start with the field they are about: "input[3]: ...", "dimensions: ...".
_FIELD = re.compile(r"([A-Za-z_]\w*)(?:\[\d+\])?(?:\.\S+)?: ")
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}

HTTP_KINDS = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
              413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_request",
              429: "too_many_requests", 503: "unavailable"}


class ApiError(Exception):
    """A request the server refuses: an HTTP status, a short machine-readable kind, and one line a
    person can act on, starting with the field it is about."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def error_body(path: str, status: int, kind: str, message: str) -> dict:
    if path not in OPENAI_ROUTES:
        return {"error": message, "type": kind}
    field = _FIELD.match(message)
    param = field.group(1) if field and field.group(1) in OPENAI_PARAMS else None
    openai_type = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": openai_type, "param": param, "code": kind}}


def error_response(path: str, status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse(error_body(path, status, kind, message), status_code=status)


def describe_errors(errors: list[dict]) -> str:
    """pydantic's errors as one line: `texts[1]: Input should be a valid string; ...` (3 at most)."""
    parts = []
    for e in errors[:3]:
        loc = [p for p in e.get("loc", ()) if p != "body"]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        parts.append(f"{where or 'body'}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"
