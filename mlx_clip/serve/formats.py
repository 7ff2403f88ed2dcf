"""The image formats the server takes, known by their magic numbers: one list for `mlxclip serve`
and `mlxclip index`, so an index never holds a file whose bytes the server would refuse.

The bytes decide, never a file name or a client's Content-Type (an HTML page named `.jpg` is
still HTML); the format found is passed to Pillow, so a file is never decoded as some other format
Pillow happens to know.
"""

from __future__ import annotations

SERVED_FORMATS = ("JPEG", "PNG", "WEBP")
HEADER_BYTES = 16  # enough for every magic number below

# Pillow's name for each format, by the bytes it starts with. Formats other than the served ones
# are listed so a refusal can say "a GIF" (415: an image, in a format not served) rather than
# "not an image" (422).
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"), (b"8BPS", "PSD"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x0a", "JPEG XL"), (b"\x00\x00\x00\x0cJXL ", "JPEG XL"), (b"qoif", "QOI"),
)
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"mif1", b"msf1", b"avif", b"avis"}


def identify(head: bytes) -> str | None:
    """The format of a file starting with `head` (at least `HEADER_BYTES` of it), None if these
    bytes start no image format known here."""
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return "HEIF/AVIF"
    return None


def refusal(head: bytes) -> str | None:
    """None when the server takes a file starting with `head`, else why not, in one phrase."""
    served = ", ".join(SERVED_FORMATS)
    if not head:
        return "empty file (0 bytes)"
    fmt = identify(head)
    if fmt in SERVED_FORMATS:
        return None
    if fmt is None:
        return f"not an image (the bytes are not {served})"
    return f"{fmt} images are not served; send {served}"
