"""A real `mlxclip serve` process on a free loopback port, and real images to send it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

import sklearn

from mlx_clip.benchmarks.serving import ServerProcess as BenchServer

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

    def __init__(self, *args: str, env: dict | None = None, timeout: float = 180, log_level: str = "warning"):
        super().__init__(*args, env=env, timeout=timeout, log_level=log_level)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")


def photo_index(photos: list[Path], out: Path) -> Path:
    """An index of the photos' folder with the built-in tiny model, as `mlxclip index` builds it."""
    from mlx_clip.index import build_index

    build_index(photos[0].parent, "tiny", out, progress=False)
    return out


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


def poll_health(url: str, seconds: float, interval: float, out: str) -> None:
    """GET /health every `interval` seconds for `seconds` (or until a file `out`.stop appears), then
    write each answer's latency and status to `out` (JSON). Prints one line once the first answer
    came. Run in a process of its own (`start_health_poller`), so that what it measures is the
    server, not a client process busy building and sending other requests."""
    import json
    import time

    import httpx

    latencies, statuses, stop = [], [], Path(out + ".stop")
    with httpx.Client(timeout=30) as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not stop.exists():
            sent = time.perf_counter()
            try:
                statuses.append(client.get(url + "/health").status_code)
            except httpx.HTTPError as err:
                statuses.append(f"{type(err).__name__}: {err}")
            latencies.append(time.perf_counter() - sent)
            if len(latencies) == 1:
                print("polling", flush=True)
            time.sleep(interval)
    Path(out).write_text(json.dumps({"latencies": latencies, "statuses": statuses}))


class HealthPoller:
    """`poll_health` in a process of its own, from `start()` to `stop()` -> (latencies, statuses)."""

    def __init__(self, url: str, out: Path, *, seconds: float = 600, interval: float = 0.02):
        import subprocess
        import sys

        self.out, self.stop_file = out, Path(str(out) + ".stop")
        self.stop_file.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from tests.serve_helpers import poll_health; "
             "poll_health(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4])",
             url, str(seconds), str(interval), str(out)],
            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "polling":
            raise RuntimeError(f"the /health poller did not start (exit {self.proc.wait()})")

    def stop(self, timeout: float = 120) -> tuple[list[float], list]:
        import json

        self.stop_file.touch()
        if self.proc.wait(timeout=timeout) != 0:
            raise RuntimeError(f"the /health poller failed (exit {self.proc.returncode})")
        data = json.loads(self.out.read_text())
        return data["latencies"], data["statuses"]
