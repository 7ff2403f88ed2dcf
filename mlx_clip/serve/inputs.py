"""What a request may carry, checked before any of it reaches an engine.

Every refusal is an `ApiError`: an HTTP status, a short machine-readable type and one line a
person can act on. Image bytes are identified by their magic numbers (`formats.py`), and the pixel
count is read from the header before anything is decoded, so a small file declaring a huge image
costs nothing. A text's length is checked before it is tokenized, so its cost is bounded before
any is paid.
"""

from __future__ import annotations

import base64
import binascii
import io
import re

import numpy as np
from PIL import Image

from mlx_clip.errors import ImageError
from mlx_clip.model.image_processing import open_image
from mlx_clip.serve.error_shapes import ApiError
from mlx_clip.serve.formats import HEADER_BYTES, SERVED_FORMATS, identify, refusal
from mlx_clip.serve.limits import Limits


def sniff_format(data: bytes, name: str) -> str:
    """Pillow's format name for served image bytes; `ApiError` 422 (not an image) or 415 (an image
    in a format not served) otherwise. The list is `formats.SERVED_FORMATS`, shared with the index."""
    fmt = identify(data[:HEADER_BYTES])
    if fmt in SERVED_FORMATS:
        return fmt
    status, kind = (422, "invalid_image") if fmt is None else (415, "unsupported_media_type")
    raise ApiError(status, kind, f"{name}: {refusal(data[:HEADER_BYTES])}")


def decode_image(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Bytes -> a fully decoded RGB image, refusing oversized images from their header alone."""
    fmt = sniff_format(data, name)
    try:
        img = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as err:
        raise ApiError(413, "image_too_large", f"{name}: {err}") from None
    except Exception as err:  # a corrupt header: Pillow raises many types
        raise ApiError(422, "invalid_image", f"{name}: cannot read the {fmt} header ({type(err).__name__})") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ApiError(413, "image_too_large",
                       f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}")
    try:
        return open_image(img, max_pixels=max_pixels)
    except ImageError as err:
        raise ApiError(422, "invalid_image", f"{name}: {err}") from None


def image_pixels(data: bytes, name: str, *, processor, max_pixels: int) -> np.ndarray:
    """Bytes -> what the engine takes for one image ((H, W, 3) float32 pixels, or NaFlex's packed
    patches), by the model's own `api.image_processor`, the transform `mlxclip embed` applies."""
    return processor(decode_image(data, name, max_pixels))


_DATA_URI = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,", re.ASCII)


def is_image_uri(value: str) -> bool:
    """Infinity's convention: an input that is a `data:image/...;base64,` URI is an image."""
    return _DATA_URI.match(value) is not None


def decode_base64_image(value: str, name: str) -> bytes:
    """A data URI or bare base64 -> bytes. URLs are refused: the server fetches nothing."""
    if not isinstance(value, str):
        raise ApiError(422, "invalid_request", f"{name}: expected a base64 string, got {type(value).__name__}")
    match = _DATA_URI.match(value)
    payload = value[match.end():] if match else value
    if not match and re.match(r"[a-z][a-z0-9+.-]*://", payload[:16], re.IGNORECASE):
        raise ApiError(422, "invalid_request", f"{name}: URLs are not fetched; send the image bytes as base64")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid_image", f"{name}: not valid base64") from None


def check_count(items: list, what: str, limit: int) -> None:
    if not items:
        raise ApiError(422, "invalid_request", f"{what}: the list is empty; send at least one")
    if len(items) > limit:
        raise ApiError(413, "too_many_items", f"{what}: {len(items)} items exceeds the limit of {limit} per request")


def check_text(text, where: str, limits: Limits) -> str:
    """`text` if it is a string of at most `max_text_chars` characters, checked with `len` (O(1),
    nothing read); 422 for a non-string, 413 past the limit. `where` names it ("texts[3]")."""
    if not isinstance(text, str):
        raise ApiError(422, "invalid_request", f"{where}: expected a string, got {type(text).__name__}")
    if len(text) > limits.max_text_chars:
        raise ApiError(413, "text_too_large",
                       f"{where}: {len(text)} characters exceeds the limit of {limits.max_text_chars} per text "
                       "(--max-text-chars)")
    return text


def check_texts(texts: list, what: str, limits: Limits) -> list[str]:
    for i, text in enumerate(texts):
        check_text(text, f"{what}[{i}]", limits)
    return texts


def check_labels(labels: list, templates: list | None, limits: Limits, default_templates: tuple[str, ...]
                 ) -> tuple[list[str], list[str]]:
    """(labels, templates) for /v1/classify, each prompt `fill(template, label)` buildable and
    distinct; 422 naming the label or template otherwise, 413 past the size limits."""
    from mlx_clip.data.templates import check_templates, prompt_name
    from mlx_clip.errors import MlxClipError

    check_count(labels, "labels", limits.max_labels)
    check_texts(labels, "labels", limits)
    if templates is not None:
        check_count(templates, "templates", limits.max_labels)
        check_texts(templates, "templates", limits)
    try:
        templates = check_templates(list(templates or default_templates))
    except MlxClipError as err:
        raise ApiError(422, "invalid_request", f"templates: {err}") from None
    # A label fills the template as its words ("red_circle" -> "red circle"): what has no words
    # makes no prompt, and two labels with the same words make the same prompt, so the same
    # probability twice.
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        name = prompt_name(label)
        if not name:
            raise ApiError(422, "invalid_request", f"labels[{i}]: {label!r} has no words (underscores count as "
                           "spaces); a label names what the image may show")
        if name in seen:
            j = seen[name]
            raise ApiError(422, "invalid_request", f"labels[{j}] {labels[j]!r} and labels[{i}] {label!r} make the "
                           f"same prompt ({name!r}); send each label once")
        seen[name] = i
    prompts = len(labels) * len(templates)
    if prompts > limits.max_prompts:
        raise ApiError(413, "too_many_items",
                       f"labels x templates: {len(labels)} labels x {len(templates)} templates = {prompts} prompts "
                       f"exceeds the limit of {limits.max_prompts} (--max-prompts)")
    return labels, templates
