"""`/v1/thumbnails/{row}`: the only route that reads an image file, and only one listed in the index.

A real server on an index whose `index.json` was edited by hand to point two rows outside the image
folder (`../secret.png`, and an absolute path), both at real PNGs that a route following paths
would serve; one indexed photo deleted after the build; the rest as `mlxclip index` wrote them.
"""

from __future__ import annotations

import http.client
import json
import shutil

import httpx
import pytest
from PIL import Image

from tests.serve_helpers import ServerProcess, photo_index, photo_variants


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("thumbs")
    photos = photo_variants(root / "photos")
    built = photo_index(photos, root / "built")
    secret = root / "secret.png"  # beside the image folder, not in it
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "private.png"
    for path in (secret, elsewhere):
        Image.new("RGB", (8, 8), (255, 0, 0)).save(path)
    edited = root / "edited"
    shutil.copytree(built, edited)
    meta = json.loads((edited / "index.json").read_text())
    paths = [entry["path"] for entry in meta["files"]]
    meta["files"][0]["path"] = "../secret.png"
    meta["files"][1]["path"] = str(elsewhere)
    (edited / "index.json").write_text(json.dumps(meta))
    deleted = photos[-1]
    deleted.unlink()
    server = ServerProcess("--model", "tiny", "--index", str(edited))
    yield {"server": server, "paths": paths, "photos": photos, "deleted": deleted.name}
    server.stop()


def raw_get(server, target: str) -> tuple[int, bytes]:
    """GET `target` sent byte for byte (httpx would resolve `..` before sending)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_a_listed_image_comes_back_small_and_cached(setup):
    server, paths = setup["server"], setup["paths"]
    row = paths.index("china.jpg")
    got = httpx.get(f"{server.url}/v1/thumbnails/{row}", timeout=60)
    assert got.status_code == 200 and got.headers["content-type"] == "image/jpeg"
    with Image.open(setup["photos"][0]) as original:
        width, height = original.size
    thumb = Image.open(__import__("io").BytesIO(got.content))
    assert max(thumb.size) == 256 and thumb.size == (round(width * 256 / max(width, height)),
                                                      round(height * 256 / max(width, height)))
    assert "max-age" in got.headers["cache-control"]
    again = httpx.get(f"{server.url}/v1/thumbnails/{row}", headers={"If-None-Match": got.headers["etag"]}, timeout=60)
    assert again.status_code == 304 and again.content == b""


@pytest.mark.parametrize("target", ["/v1/thumbnails/../../../../etc/passwd", "/v1/thumbnails/..%2f..%2fsecret.png",
                                    "/v1/thumbnails/%2Fetc%2Fpasswd", "/v1/thumbnails//etc/passwd",
                                    "/v1/thumbnails/china.jpg", "/v1/thumbnails/-1", "/v1/thumbnails/6",
                                    "/v1/thumbnails/1.5", "/v1/thumbnails/0x1"])
def test_a_path_in_the_request_reads_nothing(setup, target):
    status, body = raw_get(setup["server"], target)
    assert status in (404, 422), (target, status)
    assert not body.startswith(b"\xff\xd8") and b"root:" not in body


def test_rows_edited_to_leave_the_folder_are_refused(setup):
    server = setup["server"]
    for row, shown in ((0, "../secret.png"), (1, "private.png")):
        got = httpx.get(f"{server.url}/v1/thumbnails/{row}", timeout=60)
        assert got.status_code == 403 and got.json()["type"] == "forbidden", got.text
        assert shown in got.json()["error"] and "mlxclip index" in got.json()["error"]


def test_a_deleted_image_says_so(setup):
    server = setup["server"]
    row = setup["paths"].index(setup["deleted"])
    got = httpx.get(f"{server.url}/v1/thumbnails/{row}", timeout=60)
    assert got.status_code == 404 and got.json()["type"] == "image_missing"
    assert setup["deleted"] in got.json()["error"] and "rebuild" in got.json()["error"]
    metrics = httpx.get(server.url + "/metrics").text
    assert 'mlxclip_requests_total{route="/v1/thumbnails"}' in metrics  # one series for every row
