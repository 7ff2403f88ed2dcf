"""What a request may carry, checked before any of it reaches an engine.

Every refusal is an `ApiError`: an HTTP status, a short machine-readable type and one line a
person can act on. Image bytes are identified by their magic numbers rather than by a file name
or a client's Content-Type (an HTML page named `.jpg` is still HTML), and the pixel count is read
from the header before anything is decoded, so a small file declaring a huge image costs nothing.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from mlx_clip.errors import ImageError
from mlx_clip.image_processing import open_image, preprocess


class ApiError(Exception):
    """A request the server refuses; the body is `{"error": message, "type": kind}`."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 16 * 2 ** 20
    max_items: int = 64
    max_labels: int = 1000
    max_k: int = 1000
    max_image_pixels: int = 40_000_000
    max_concurrent_requests: int = 64
    truncate: bool = True

    def describe(self) -> dict:
        return {"max_body_mb": self.max_body_bytes / 2 ** 20, "max_items": self.max_items,
                "max_labels": self.max_labels, "max_k": self.max_k, "max_image_pixels": self.max_image_pixels,
                "max_concurrent_requests": self.max_concurrent_requests, "truncate": self.truncate}


# The formats served, by magic number, and Pillow's name for each (passed to Image.open so a file
# can never be decoded as some other format Pillow happens to know).
_SERVED = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
)
# Recognised but not served: an image, so 415 rather than 422.
_OTHER_IMAGES = (
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"), (b"8BPS", "PSD"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x0a", "JPEG XL"), (b"\x00\x00\x00\x0cJXL ", "JPEG XL"), (b"qoif", "QOI"),
)
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"mif1", b"msf1", b"avif", b"avis"}
SERVED_FORMATS = ("JPEG", "PNG", "WEBP")


def sniff_format(data: bytes, name: str) -> str:
    """Pillow's format name for served image bytes; `ApiError` 422 / 415 otherwise."""
    if not data:
        raise ApiError(422, "invalid_image", f"{name}: empty file (0 bytes)")
    for magic, fmt in _SERVED:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    found = next((fmt for magic, fmt in _OTHER_IMAGES if data.startswith(magic)), None)
    if found is None and data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        found = "HEIF/AVIF"
    if found is not None:
        raise ApiError(415, "unsupported_media_type",
                       f"{name}: {found} images are not served; send {', '.join(SERVED_FORMATS)}")
    raise ApiError(422, "invalid_image", f"{name}: not an image (the bytes are not {', '.join(SERVED_FORMATS)})")


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


def image_pixels(data: bytes, name: str, *, image_size: int, mean, std, max_pixels: int,
                 crop: bool = True) -> np.ndarray:
    """Bytes -> (H, W, 3) float32 pixels, the same transform `mlxclip embed` applies."""
    return preprocess(decode_image(data, name, max_pixels), image_size, mean=mean, std=std, crop=crop)


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
