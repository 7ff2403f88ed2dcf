"""A real `mlxclip serve` process on a free loopback port, and real images to send it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

import sklearn

from benchmarks.serving import ServerProcess as BenchServer

# Two photographs shipped inside scikit-learn's wheel: real JPEGs nobody here made.
PHOTOS = Path(sklearn.__file__).parent / "datasets" / "images"


def photo_variants(folder: Path) -> list[Path]:
    """Six real images: both photos as shipped, and crops of them re-encoded as PNG and WebP."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ("china.jpg", "flower.jpg"):
        original = folder / name
        original.write_bytes((PHOTOS / name).read_bytes())
        paths.append(original)
        with Image.open(original) as img:
            w, h = img.size
            for i, (fmt, box) in enumerate((("PNG", (0, 0, w // 2, h // 2)), ("WEBP", (w // 3, h // 4, w, h)))):
                path = folder / f"{Path(name).stem}-{i}.{fmt.lower()}"
                img.crop(box).save(path, fmt)
                paths.append(path)
    return paths


class ServerProcess(BenchServer):
    """The load benchmark's server launcher, with the resident memory the tests bound."""

    def __init__(self, *args: str, env: dict | None = None, timeout: float = 180):
        super().__init__(*args, env=env, timeout=timeout)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A valid PNG header declaring width x height, with almost no data: a decompression bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def as_array(rows) -> np.ndarray:
    return np.asarray(rows, dtype=np.float32)
