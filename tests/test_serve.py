"""`mlxclip serve` as a client meets it: a real server process on a loopback port, real HTTP.

Embeddings are compared with `mlx_clip.embed.embed` (what `mlxclip embed` writes) on the same
inputs: the server runs the same preprocessing and engine, so the only difference allowed is the
float32 summation order of a different batch composition, far below 1e-6 on unit vectors.
"""

from __future__ import annotations

import base64
import concurrent.futures
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from mlx_clip.embed import embed
from tests.serve_helpers import ServerProcess, as_array, bomb_png, encode, photo_index, photo_variants

TOL = 1e-6
MAX_ITEMS = 8
MAX_LABELS = 16
MAX_BODY_MB = 1
MAX_CONCURRENT = 4


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return photo_variants(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def index_dir(photos, tmp_path_factory):
    return photo_index(photos, tmp_path_factory.mktemp("index") / "idx")


@pytest.fixture(scope="module", params=["mlx", "torch"])
def server(request, index_dir):
    proc = ServerProcess("--model", "tiny", "--backend", request.param, "--index", str(index_dir),
                         "--max-items", str(MAX_ITEMS), "--max-labels", str(MAX_LABELS),
                         "--max-body-mb", str(MAX_BODY_MB), "--max-concurrent-requests", str(MAX_CONCURRENT),
                         "--max-wait-ms", "20")
    proc.backend = request.param
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def strict_server():
    """No truncation, an API key, no index."""
    proc = ServerProcess("--model", "tiny", "--no-truncate", env={"MLXCLIP_API_KEY": "s3cret"})
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def reference(server, photos, tmp_path_factory):
    texts = ["a photo of a cat", "Großes Haus am See", "", "🙂 emoji and punctuation!?", "a " * 100]
    out = tmp_path_factory.mktemp("ref") / f"ref-{server.backend}.npz"
    arrays = embed("tiny", images=photos, texts=texts, out=out, backend=server.backend)
    return {"images": arrays["image_embeds"], "texts": arrays["text_embeds"], "text_list": texts}


def post_files(url: str, paths, field: str = "files", **kw) -> httpx.Response:
    files = [(field, (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]
    return httpx.post(url, files=files, timeout=60, **kw)


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def assert_error(response: httpx.Response, status: int, kind: str | None = None) -> dict:
    """Our shape, `{"error": message, "type": kind}`; OpenAI's on its route (returned as ours)."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    if response.request.url.path == "/v1/embeddings":
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        body = {"error": body["error"]["message"], "type": body["error"]["code"]}
    assert set(body) == {"error", "type"} and isinstance(body["error"], str) and body["error"], body
    if kind is not None:
        assert body["type"] == kind, body
    return body


# --- the main paths ------------------------------------------------------------------------------
def test_health_info_and_docs(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    info = httpx.get(server.url + "/info").json()
    assert info["engine"] == server.backend and info["embedding_dim"] == 64 and info["index"] == {"images": 6, "thumbnails": True}
    assert info["limits"]["max_items"] == MAX_ITEMS
    assert httpx.get(server.url + "/docs").status_code == 200
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    assert {"/v1/embed/images", "/v1/embed/texts", "/v1/embeddings", "/v1/classify", "/v1/search"} <= set(paths)


def test_image_routes_equal_mlxclip_embed(server, photos, reference):
    multipart = as_array(post_files(server.url + "/v1/embed/images", photos).json()["embeddings"])
    np.testing.assert_allclose(multipart, reference["images"], atol=TOL)
    as_json = httpx.post(server.url + "/v1/embed/images", json={"images": [b64(p) for p in photos]}, timeout=60)
    np.testing.assert_allclose(as_array(as_json.json()["embeddings"]), reference["images"], atol=TOL)
    np.testing.assert_allclose(np.linalg.norm(multipart, axis=1), 1.0, atol=1e-6)


def test_text_route_equals_mlxclip_embed(server, reference):
    got = httpx.post(server.url + "/v1/embed/texts", json={"texts": reference["text_list"]}, timeout=60)
    np.testing.assert_allclose(as_array(got.json()["embeddings"]), reference["texts"], atol=TOL)


def test_openai_client_gets_the_same_embeddings(server, photos, reference):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    texts = reference["text_list"]
    # The client asks for base64 unless told otherwise, then decodes it: both encodings are exercised.
    for fmt in (openai.NOT_GIVEN, "float"):
        result = client.embeddings.create(model="any-name", input=texts, encoding_format=fmt)
        assert result.model == "any-name" and [d.index for d in result.data] == list(range(len(texts)))
        np.testing.assert_allclose(as_array([d.embedding for d in result.data]), reference["texts"], atol=TOL)
        assert result.usage.prompt_tokens > len(texts)
    uri = "data:image/jpeg;base64," + b64(photos[0])
    mixed = client.embeddings.create(model="m", input=[texts[0], uri])
    np.testing.assert_allclose(as_array(mixed.data[1].embedding), reference["images"][0], atol=TOL)
    np.testing.assert_allclose(as_array(mixed.data[0].embedding), reference["texts"][0], atol=TOL)
    single = client.embeddings.create(model="m", input=texts[1])
    np.testing.assert_allclose(as_array(single.data[0].embedding), reference["texts"][1], atol=TOL)


def test_concurrent_requests_are_batched_and_equal_alone(server, photos, reference):
    def one(i):
        path = photos[i % len(photos)]
        return i, as_array(post_files(server.url + "/v1/embed/images", [path]).json()["embeddings"][0])

    before = _metric_sum(server, "mlxclip_batch_size_count", 'kind="image"')
    rows_before = _metric_sum(server, "mlxclip_batch_size_sum", 'kind="image"')
    with concurrent.futures.ThreadPoolExecutor(MAX_CONCURRENT) as pool:
        results = list(pool.map(one, range(24)))
    for i, row in results:
        np.testing.assert_allclose(row, reference["images"][i % len(photos)], atol=TOL)
    calls = _metric_sum(server, "mlxclip_batch_size_count", 'kind="image"') - before
    rows = _metric_sum(server, "mlxclip_batch_size_sum", 'kind="image"') - rows_before
    assert rows == 24 and calls < 24, (rows, calls)  # some engine calls carried several requests


def _metric_sum(server, name: str, label: str = "") -> float:
    text = httpx.get(server.url + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and label in line)


def test_classify_is_the_zero_shot_softmax(server, photos, reference):
    labels = ["a cat", "a house", "a flower"]
    got = post_files(server.url + "/v1/classify", [photos[3]], field="file", data={"labels": labels}).json()
    texts = embed("tiny", texts=[f"a photo of a {x}." for x in labels], out=photos[0].parent / "cls.npz",
                  backend=server.backend)["text_embeds"]
    logits = 100.0 * reference["images"][3].astype(np.float64) @ texts.T.astype(np.float64)
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(got["probabilities"], expected, atol=1e-4)  # 100x scale amplifies 1e-6
    assert got["labels"] == labels and got["best"] == labels[int(np.argmax(expected))]
    by_json = httpx.post(server.url + "/v1/classify", json={"image": b64(photos[3]), "labels": labels,
                                                           "templates": ["a photo of a {}."]}, timeout=60)
    np.testing.assert_allclose(by_json.json()["probabilities"], got["probabilities"], atol=1e-6)


def test_search_finds_the_query_image_first(server, photos, reference):
    got = post_files(server.url + "/v1/search", [photos[4]], field="file", data={"k": "3"}).json()["results"]
    assert got[0]["path"] == photos[4].name and abs(got[0]["score"] - 1.0) < 1e-5 and len(got) == 3
    text = httpx.post(server.url + "/v1/search", json={"text": "a photo of a cat", "k": 10}, timeout=60).json()
    names = sorted(p.name for p in photos)
    scores = reference["images"] @ reference["texts"][0]
    expected = sorted(zip(scores, [p.name for p in photos]), key=lambda t: -t[0])
    assert [r["path"] for r in text["results"]] == [name for _, name in expected] and len(names) == 6
    np.testing.assert_allclose([r["score"] for r in text["results"]], [s for s, _ in expected], atol=TOL)


# --- refusals ---------------------------------------------------------------------------------------
def _truncated_jpeg(photos) -> bytes:
    data = photos[0].read_bytes()
    return data[: len(data) // 3]


BAD_IMAGES = {
    "not an image": (lambda photos: b"just some text, not pixels" * 10, 422, "invalid_image"),
    "html named .jpg": (lambda photos: b"<!DOCTYPE html><html><body>404</body></html>", 422, "invalid_image"),
    "zero bytes": (lambda photos: b"", 422, "invalid_image"),
    "truncated jpeg": (_truncated_jpeg, 422, "invalid_image"),
    "decompression bomb": (lambda photos: bomb_png(), 413, "image_too_large"),
    "gif": (lambda photos: encode(Image.new("RGB", (8, 8)), "GIF"), 415, "unsupported_media_type"),
    "bmp": (lambda photos: encode(Image.new("RGB", (8, 8)), "BMP"), 415, "unsupported_media_type"),
    "tiff": (lambda photos: encode(Image.new("RGB", (8, 8)), "TIFF"), 415, "unsupported_media_type"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_images_are_refused_and_the_server_stays_healthy(server, photos, case):
    make, status, kind = BAD_IMAGES[case]
    data = make(photos)
    files = [("files", ("upload.jpg", data, "image/jpeg"))]
    body = assert_error(httpx.post(server.url + "/v1/embed/images", files=files, timeout=60), status, kind)
    assert "upload.jpg" in body["error"]
    as_json = httpx.post(server.url + "/v1/embed/images", json={"images": [base64.b64encode(data).decode()]},
                         timeout=60)
    assert_error(as_json, status, kind)
    assert httpx.get(server.url + "/health").status_code == 200


BAD_REQUESTS = {
    "invalid json": ("/v1/embed/texts", dict(content=b"{not json", headers={"content-type": "application/json"}),
                     422),
    "texts not a list": ("/v1/embed/texts", dict(json={"texts": "one string"}), 422),
    "texts of numbers": ("/v1/embed/texts", dict(json={"texts": [1, 2]}), 422),
    "unknown field": ("/v1/embed/texts", dict(json={"texts": ["a"], "extra": 1}), 422),
    "empty texts": ("/v1/embed/texts", dict(json={"texts": []}), 422),
    "too many texts": ("/v1/embed/texts", dict(json={"texts": ["a"] * (MAX_ITEMS + 1)}), 413),
    "empty images": ("/v1/embed/images", dict(json={"images": []}), 422),
    "image url": ("/v1/embed/images", dict(json={"images": ["https://example.com/cat.jpg"]}), 422),
    "bad base64": ("/v1/embed/images", dict(json={"images": ["%%%not-base64%%%"]}), 422),
    "plain text body": ("/v1/embed/images", dict(content=b"hi", headers={"content-type": "text/plain"}), 415),
    "openai token arrays": ("/v1/embeddings", dict(json={"model": "m", "input": [[1, 2, 3]]}), 422),
    "openai empty input": ("/v1/embeddings", dict(json={"model": "m", "input": []}), 422),
    "openai wrong dimensions": ("/v1/embeddings", dict(json={"model": "m", "input": "a", "dimensions": 7}), 422),
    "too many labels": ("/v1/classify", "labels", 413),
    "duplicate labels": ("/v1/classify", "duplicates", 422),
    "no labels": ("/v1/classify", "none", 422),
    "search without query": ("/v1/search", dict(json={"k": 3}), 422),
    "search k zero": ("/v1/search", dict(json={"text": "a", "k": 0}), 422),
    "unknown route": ("/v1/nothing", dict(json={}), 404),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_json_errors(server, photos, case):
    route, kwargs, status = BAD_REQUESTS[case]
    if route == "/v1/classify":
        labels = {"labels": [f"l{i}" for i in range(MAX_LABELS + 1)], "duplicates": ["a", "a"], "none": []}[kwargs]
        kwargs = dict(json={"image": b64(photos[0]), "labels": labels})
    assert_error(httpx.post(server.url + route, timeout=60, **kwargs), status)
    assert httpx.get(server.url + "/health").status_code == 200


def test_oversized_bodies_are_refused(server, photos):
    big = b"\0" * (MAX_BODY_MB * 2 ** 20 + 1)
    declared = httpx.post(server.url + "/v1/embed/images", files=[("files", ("a.jpg", big))], timeout=60)
    assert_error(declared, 413, "payload_too_large")

    def chunks():  # no Content-Length: the limit has to hold while the body streams in
        for _ in range(MAX_BODY_MB * 4 + 1):
            yield b" " * 2 ** 18

    streamed = httpx.post(server.url + "/v1/embed/texts", content=chunks(),
                          headers={"content-type": "application/json"}, timeout=60)
    assert_error(streamed, 413, "payload_too_large")
    assert httpx.get(server.url + "/health").status_code == 200


def test_too_many_files_is_413(server, photos):
    paths = (photos * 2)[: MAX_ITEMS + 1]
    assert_error(post_files(server.url + "/v1/embed/images", paths), 413, "too_many_items")


def test_past_the_concurrency_limit_answers_429_at_once(server):
    # Requests that announce a body and send only part of it stay in flight as long as we like.
    stalled = []
    for _ in range(MAX_CONCURRENT):
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(b"POST /v1/embed/texts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"texts\": [")
        stalled.append(s)
    try:
        time.sleep(0.5)
        started = time.monotonic()
        refused = httpx.post(server.url + "/v1/embed/texts", json={"texts": ["a"]}, timeout=10)
        assert_error(refused, 429, "too_many_requests")
        assert time.monotonic() - started < 2.0
        assert httpx.get(server.url + "/health").status_code == 200  # health is never refused
    finally:
        for s in stalled:
            s.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if httpx.post(server.url + "/v1/embed/texts", json={"texts": ["a"]}, timeout=10).status_code == 200:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the server did not recover after the stalled requests closed")


def test_metrics_count_requests_and_failures(server):
    httpx.post(server.url + "/v1/embed/texts", json={"texts": []})
    text = httpx.get(server.url + "/metrics").text
    assert 'mlxclip_request_failures_total{route="/v1/embed/texts",status="422"}' in text
    for name in ("mlxclip_requests_total", "mlxclip_request_latency_seconds_bucket", "mlxclip_queue_time_seconds",
                 "mlxclip_batch_size_bucket", "mlxclip_queue_depth", "mlxclip_requests_in_flight"):
        assert name in text, name


def test_memory_stays_bounded_under_bad_input(server, photos):
    """Bombs, oversized bodies and garbage, many times: the process must not keep any of it."""
    def barrage():
        for _ in range(5):
            for make, _, _ in BAD_IMAGES.values():
                httpx.post(server.url + "/v1/embed/images", files=[("files", ("x.png", make(photos)))], timeout=60)
            httpx.post(server.url + "/v1/embed/images", files=[("files", ("a.jpg", b"\0" * 2 ** 21))], timeout=60)

    barrage()  # first round: allocator pools and caches settle
    settled = server.rss_bytes()
    barrage()
    assert server.rss_bytes() - settled < 64 * 2 ** 20
    assert httpx.get(server.url + "/health").status_code == 200


# --- the strict server: API key, no truncation, no index ----------------------------------------------
def test_api_key_is_required_everywhere_but_health(strict_server):
    url = strict_server.url
    assert httpx.get(url + "/health").status_code == 200
    for method, route in (("get", "/info"), ("get", "/metrics"), ("get", "/docs"), ("post", "/v1/embed/texts"),
                          ("get", "/v1/thumbnails/0")):
        assert_error(getattr(httpx, method)(url + route), 401, "unauthorized")
    wrong = httpx.get(url + "/info", headers={"Authorization": "Bearer nope"})
    assert_error(wrong, 401, "unauthorized")
    assert httpx.get(url + "/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_no_truncate_refuses_long_texts(strict_server):
    auth = {"Authorization": "Bearer s3cret"}
    ok = httpx.post(strict_server.url + "/v1/embed/texts", json={"texts": ["short"]}, headers=auth, timeout=60)
    assert ok.status_code == 200
    long = httpx.post(strict_server.url + "/v1/embed/texts", json={"texts": ["short", "word " * 100]},
                      headers=auth, timeout=60)
    body = assert_error(long, 422, "text_too_long")
    assert "texts[1]" in body["error"]


def test_search_without_an_index_says_how_to_get_one(strict_server):
    got = httpx.post(strict_server.url + "/v1/search", json={"text": "a"},
                     headers={"Authorization": "Bearer s3cret"}, timeout=60)
    assert "--index" in assert_error(got, 404, "no_index")["error"]
    thumbnail = httpx.get(strict_server.url + "/v1/thumbnails/0", headers={"Authorization": "Bearer s3cret"})
    assert "--index" in assert_error(thumbnail, 404, "no_index")["error"]


def test_serve_refuses_a_missing_model_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mlx_clip", "serve", "--model", str(tmp_path / "nope"),
                             "--port", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr


def test_serve_option_defaults_are_the_limits_defaults():
    """The CLI's options spell the defaults out (declared when cli.py is imported, which loads no
    server module); they must stay those of `Limits`, which the server uses as a library."""
    from mlx_clip.cli import main
    from mlx_clip.serve.limits import Limits

    defaults = {p.name: p.default for p in main.commands["serve"].params}
    limits = Limits()
    assert defaults["max_body_mb"] * 2 ** 20 == limits.max_body_bytes
    for name in ("max_items", "max_labels", "max_prompts", "max_text_chars", "max_concurrent_requests",
                 "max_image_pixels"):
        assert defaults[name] == getattr(limits, name), name
