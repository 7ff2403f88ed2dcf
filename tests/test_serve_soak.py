"""A soak: 16 clients on loopback send a mix of good and hostile requests to a real `mlxclip serve`
for `SOAK_SECONDS`, while a process of its own polls `/health`.

Every answer must be 2xx or 4xx (a 5xx or a timeout is a bug), `/health` must stay fast throughout
(p99 under `HEALTH_P99_S`) and the server's resident memory must not grow by more than `RSS_GROWTH`
after a warm-up that has sent every kind of request once.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import random
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serve_helpers import HealthPoller, ServerProcess, bomb_png, encode, photo_index, photo_variants

SOAK_SECONDS = 60.0
CLIENTS = 16
HEALTH_INTERVAL_S = 0.05
HEALTH_P99_S = 0.100
RSS_GROWTH = 64 * 2 ** 20
REQUEST_TIMEOUT_S = 60.0

pytestmark = pytest.mark.slow


def _catalogue(photos: list[Path], limits: dict) -> dict:
    """name -> (weight, rng -> (method, route, httpx keyword arguments)). Payloads that cost the
    client much to build are built once here."""
    jpeg, png = photos[0].read_bytes(), photos[1].read_bytes()
    b64 = base64.b64encode(jpeg).decode()
    uri = "data:image/jpeg;base64," + base64.b64encode(png).decode()
    chars, items = limits["max_text_chars"], limits["max_items"]
    rng0 = random.Random(1)
    vocabulary = ["cat", "house", "river", "Großes", "🙂", "photo", "a", "of", "красный", "круг"]
    maximal = [json.dumps({"texts": [" ".join(rng0.choices(vocabulary, k=chars))[:chars] for _ in range(items)]})
               for _ in range(4)]
    huge = json.dumps({"texts": [" ".join(rng0.choices(vocabulary, k=100_000)) for _ in range(4)]}).encode()
    small = Image.new("RGB", (16, 16), (200, 30, 30))
    bad_images = [jpeg[: len(jpeg) // 3], bomb_png(), encode(small, "BMP"), encode(small, "GIF"),
                  b"<!DOCTYPE html><html>404</html>", b"", b"\x00" * 4096]
    nested = b"[" * 100_000 + b"]" * 100_000
    json_kind = {"content-type": "application/json"}
    over_body = int(limits["max_body_mb"] * 2 ** 20) + 1

    def text(rng: random.Random, n: int = 6) -> str:
        return " ".join(rng.choices(vocabulary, k=rng.randint(1, n)))

    def labels(rng: random.Random) -> list[str]:
        return rng.sample(["a cat", "a house", "a red circle", "a river", "a flower", "a dog"], rng.randint(1, 4))

    return {
        # the good
        "texts": (8, lambda r: ("POST", "/v1/embed/texts", {"json": {"texts": [text(r) for _ in range(r.randint(1, 8))]}})),
        "images multipart": (5, lambda r: ("POST", "/v1/embed/images", {"files": [("files", ("a.jpg", jpeg))]})),
        "images json": (3, lambda r: ("POST", "/v1/embed/images", {"json": {"images": [b64]}})),
        "openai": (5, lambda r: ("POST", "/v1/embeddings", {"json": {"model": "m", "input": [text(r), uri]}})),
        "classify": (4, lambda r: ("POST", "/v1/classify", {"json": {"image": b64, "labels": labels(r)}})),
        "classify multipart array": (2, lambda r: ("POST", "/v1/classify", {
            "files": [("file", ("a.png", png))], "data": {"labels": json.dumps(labels(r))}})),
        "search": (3, lambda r: ("POST", "/v1/search", {"json": {"text": text(r), "k": r.randint(1, 20)}})),
        "search image": (2, lambda r: ("POST", "/v1/search", {"files": [("file", ("a.jpg", jpeg))], "data": {"k": "3"}})),
        "maximal texts": (2, lambda r: ("POST", "/v1/embed/texts", {"content": r.choice(maximal), "headers": json_kind})),
        "info": (1, lambda r: ("GET", "/info", {})),
        "metrics": (1, lambda r: ("GET", "/metrics", {})),
        # the hostile
        "huge texts": (1, lambda r: ("POST", "/v1/embed/texts", {"content": huge, "headers": json_kind})),
        "body over the limit": (1, lambda r: ("POST", r.choice(["/v1/embed/texts", "/v1/embeddings"]), {
            "content": b" " * over_body, "headers": json_kind})),
        "bad image": (4, lambda r: ("POST", "/v1/embed/images", {"files": [("files", ("x.jpg", r.choice(bad_images)))]})),
        "bad base64": (1, lambda r: ("POST", "/v1/embed/images", {"json": {"images": ["%%%", "https://x.y/z.jpg"]}})),
        "bad labels": (4, lambda r: ("POST", "/v1/classify", {"json": {"image": b64, "labels": r.choice(
            [["cat", ""], ["_"], ["   ", "dog"], ["cat", "cat "], ["red_circle", "red circle"], [], ["a"] * 2000,
             [f"x{i}" for i in range(limits["max_labels"])]])}})),
        "too many prompts": (1, lambda r: ("POST", "/v1/classify", {"json": {
            "image": b64, "labels": [f"x{i}" for i in range(100)], "templates": [f"{{}} {j}" for j in range(100)]}})),
        "bad templates": (1, lambda r: ("POST", "/v1/classify", {"json": {"image": b64, "labels": ["a"],
                                                                          "templates": r.choice([[], ["no slot"], ["{} {}"]])}})),
        "broken labels array": (1, lambda r: ("POST", "/v1/classify", {
            "files": [("file", ("a.png", png))], "data": {"labels": r.choice(['["a", ', '["a", 1]', "[[[[]]]]"])}})),
        "nested json": (3, lambda r: ("POST", r.choice(["/v1/embed/texts", "/v1/embed/images", "/v1/embeddings",
                                                        "/v1/classify", "/v1/search"]),
                                      {"content": nested, "headers": json_kind})),
        "token arrays": (2, lambda r: ("POST", "/v1/embeddings", {"json": {"input": r.choice([[1, 2], [[1, 2], [3]], [1, "a"]])}})),
        "wrong dimensions": (1, lambda r: ("POST", "/v1/embeddings", {"json": {"input": "a", "dimensions": r.choice([0, 7, -1])}})),
        "wrong keys": (2, lambda r: ("POST", r.choice(["/v1/embed/texts", "/v1/embed/images", "/v1/search"]),
                                     {"json": r.choice([{"text": "a"}, {"texts": ["a"], "x": 1}, {"images": "a"}, {"k": "many"},
                                                        [], "texts", None, {"texts": None}])})),
        "invalid json": (2, lambda r: ("POST", r.choice(["/v1/embed/texts", "/v1/embeddings", "/v1/classify"]), {
            "content": r.choice([b"{nope", b"\xff\xfe\x00garbage", b'{"texts": ["\\ud800"]}', b""]), "headers": json_kind})),
        "wrong content type": (1, lambda r: ("POST", "/v1/embed/images", {"content": b"hi", "headers": {"content-type": "text/plain"}})),
        "search k": (1, lambda r: ("POST", "/v1/search", {"json": {"text": "a", "k": r.choice([0, 10 ** 9, "x"])}})),
        "unknown route": (1, lambda r: (r.choice(["GET", "POST"]), r.choice(["/v1/nothing", "/v1/embed/texts"]), {})),
    }


def warm_shapes(url: str, jpeg: bytes, limits: dict) -> None:
    from mlx_clip.serve.service import batch_bucket

    info = httpx.get(url + "/info").json()
    largest = info["batching"]["max_batch_size"]
    sizes = sorted({batch_bucket(n) for n in range(1, largest + 1)})
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as http:
        for rows in sizes:
            for words in range(1, info["context_length"], 8):  # every multiple of 8 tokens the ids trim to
                got = http.post(url + "/v1/embed/texts", json={"texts": [" ".join(["cat"] * words)] * rows})
                assert got.status_code == 200, got.text
            got = http.post(url + "/v1/embed/images", files=[("files", ("a.jpg", jpeg))] * rows)
            assert got.status_code in (200, 413), got.text  # 413: more rows than --max-items


async def _soak(url: str, catalogue: dict, seconds: float, seed: int) -> dict:
    names = list(catalogue)
    weights = [catalogue[n][0] for n in names]
    statuses: dict[str, collections.Counter] = {n: collections.Counter() for n in names}
    failures: list[str] = []
    deadline = time.monotonic() + seconds

    async def client(http: httpx.AsyncClient, rng: random.Random):
        while time.monotonic() < deadline:
            name = rng.choices(names, weights)[0]
            method, route, kwargs = catalogue[name][1](rng)
            try:
                status = (await http.request(method, url + route, **kwargs)).status_code
            except httpx.HTTPError as err:
                status = f"{type(err).__name__}"
                failures.append(f"{name}: {method} {route}: {type(err).__name__}: {err}")
            statuses[name][status] += 1
            if not isinstance(status, int) or status >= 500:
                failures.append(f"{name}: {method} {route} -> {status}")

    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as http:
        await asyncio.gather(*(client(http, random.Random(seed * 100 + i)) for i in range(CLIENTS)))
    return {"statuses": statuses, "failures": failures}


def test_soak_mixed_good_and_hostile_traffic(tmp_path, capsys):
    photos = photo_variants(tmp_path / "photos")
    index = photo_index(photos, tmp_path / "idx")
    server = ServerProcess("--model", "tiny", "--index", str(index), log_level="error")
    try:
        limits = httpx.get(server.url + "/info").json()["limits"]
        catalogue = _catalogue(photos, limits)
        # Warm-up. First every batch shape the engine can meet, one request at a time: a compiled
        # engine keeps a graph and buffers per shape (the server pads batches to a few sizes,
        # `service.batch_bucket`); then every kind of request, so allocator pools and caches settle.
        warm_shapes(server.url, photos[0].read_bytes(), limits)
        warm = {name: (1, make) for name, (_, make) in catalogue.items()}
        warm_up = asyncio.run(_soak(server.url, warm, 8.0, seed=0))
        assert not warm_up["failures"], warm_up["failures"][:10]
        rss_before = server.rss_bytes()
        poller = HealthPoller(server.url, tmp_path / "health.json", seconds=SOAK_SECONDS + 120,
                              interval=HEALTH_INTERVAL_S)
        started = time.monotonic()
        try:
            result = asyncio.run(_soak(server.url, catalogue, SOAK_SECONDS, seed=1))
        finally:
            latencies, health_statuses = poller.stop()
        elapsed = time.monotonic() - started
        rss_after = server.rss_bytes()
        output = server.output()
    finally:
        server.stop()
    ms = np.array(latencies) * 1000
    counts = {name: dict(c) for name, c in result["statuses"].items()}
    total = sum(sum(c.values()) for c in result["statuses"].values())
    figures = {
        "seconds": round(elapsed, 1), "clients": CLIENTS, "requests": total, "requests_per_s": round(total / elapsed, 1),
        "status_counts": dict(sum((collections.Counter({str(k): v}) for c in counts.values() for k, v in c.items()),
                                  collections.Counter())),
        "health_polls": len(ms), "health_p50_ms": round(float(np.percentile(ms, 50)), 1),
        "health_p99_ms": round(float(np.percentile(ms, 99)), 1), "health_max_ms": round(float(ms.max()), 1),
        "rss_before_mb": round(rss_before / 2 ** 20, 1), "rss_after_mb": round(rss_after / 2 ** 20, 1),
        "rss_growth_mb": round((rss_after - rss_before) / 2 ** 20, 1),
    }
    with capsys.disabled():
        print("\nsoak:", json.dumps(figures))
        print("soak statuses by request kind:", json.dumps(counts))
    assert not result["failures"], result["failures"][:10]
    assert all(s == 200 for s in health_statuses), [s for s in health_statuses if s != 200][:5]
    assert figures["health_p99_ms"] < HEALTH_P99_S * 1000, figures
    assert rss_after - rss_before < RSS_GROWTH, figures
    assert "Traceback" not in output, output[-3000:]
