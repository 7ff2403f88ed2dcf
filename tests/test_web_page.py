"""The web page of `mlxclip serve`, driven in a real headless Chromium against real servers.

The answers the page must show are computed here independently of the server: embeddings from
`mlx_clip.embed.embed` (what `mlxclip embed` writes), zero-shot probabilities as the softmax of 100x
cosines (CLIP_benchmark's classifier), thumbnails' sizes from the photos' own dimensions. Each test
saves a screenshot: under $MLXCLIP_BENCH_OUT/screenshots (CI keeps it), else the test's tmp folder.

Needs the `playwright` package (a [test] extra) and a Chromium: Debian's `chromium` (which `.ci/run`
installs), or $MLXCLIP_CHROMIUM. Without either, the tests skip saying which is missing.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlx_clip.embed import embed
from tests.serve_helpers import ServerProcess, photo_index, photo_variants

API_KEY = "s3cret"
SMALL_BODY_MB = 0.05  # below the photos' size (china.jpg is ~196 KB): their upload is "huge" for this server
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update"]
TIMEOUT_MS = 60_000  # a search embeds on a 2-core CPU next to a browser


def expect(locator):
    """Playwright's retrying assertions (the page's CSP forbids eval, so no wait_for_function)."""
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def _chromium() -> str | None:
    given = os.environ.get("MLXCLIP_CHROMIUM")
    if given:
        return given
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install -e '.[test]')")
    executable = _chromium()
    if executable is None:
        pytest.skip("no Chromium found: install Debian's chromium (apt-get install chromium) or set MLXCLIP_CHROMIUM")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, request, tmp_path):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    tab.on("pageerror", lambda err: errors.append(str(err)))
    yield tab
    tab.screenshot(path=str(_screenshot_dir(tmp_path) / f"{request.node.name}.png"), full_page=True)
    context.close()
    assert not errors, f"the page's script failed: {errors}"


def _screenshot_dir(tmp_path: Path) -> Path:
    root = os.environ.get("MLXCLIP_BENCH_OUT")
    folder = Path(root) / "screenshots" if root else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return photo_variants(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def server(photos, tmp_path_factory):
    proc = ServerProcess("--model", "tiny", "--index", str(photo_index(photos, tmp_path_factory.mktemp("i") / "idx")),
                         "--max-wait-ms", "0")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def guarded_server():
    """An API key, a small body limit, no index."""
    proc = ServerProcess("--model", "tiny", "--max-body-mb", str(SMALL_BODY_MB), env={"MLXCLIP_API_KEY": API_KEY})
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def reference(photos, tmp_path_factory):
    return embed("tiny", images=photos, out=tmp_path_factory.mktemp("ref") / "images.npz")["image_embeds"]


def drop_file(page, selector: str, path: Path) -> None:
    """A real drag-and-drop of `path`'s bytes onto `selector`: dragover, then drop, with a DataTransfer."""
    mime = {".jpg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}[path.suffix]
    page.evaluate("""([selector, name, data, mime]) => {
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, { type: mime }));
        const zone = document.querySelector(selector);
        for (const type of ["dragover", "drop"])
            zone.dispatchEvent(new DragEvent(type, { dataTransfer: transfer, bubbles: true, cancelable: true }));
    }""", [selector, path.name, base64.b64encode(path.read_bytes()).decode(), mime])


def shown_results(page) -> list[dict]:
    page.wait_for_selector("#results li img")
    return page.eval_on_selector_all("#results li", """items => items.map((li) => ({
        path: li.dataset.path, score: parseFloat(li.dataset.score),
        text: li.innerText, image: li.querySelector('img') && [li.querySelector('img').naturalWidth,
                                                           li.querySelector('img').naturalHeight]}))""")


def open_page(page, url: str) -> None:
    page.goto(url + "/")
    page.wait_for_selector("#card-info dd")


def test_the_card_shows_the_model_and_live_figures(page, server):
    import httpx

    info = httpx.get(server.url + "/info").json()
    open_page(page, server.url)
    card = dict(zip(page.locator("#card-info dt").all_inner_texts(), page.locator("#card-info dd").all_inner_texts()))
    assert card["model"] == "tiny" and card["engine"] == "mlx"
    assert card["embedding dims"] == str(info["embedding_dim"]) and card["index"] == f"{info['index']['images']} images"
    assert card["image size"] == f"{info['image_size']} px"
    assert "script-src 'self'" in httpx.get(server.url + "/").headers["content-security-policy"]
    expect(page.locator('#card-live dd[data-field="requests/s"]')).not_to_have_text("—")  # a second sample came
    live = dict(zip(page.locator("#card-live dt").all_inner_texts(), page.locator("#card-live dd").all_inner_texts()))
    assert float(live["requests/s"]) >= 0 and live["in flight"] == "0", live
    assert page.locator("#no-index").is_hidden()


def _histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile as its documentation states it: find the bucket holding rank
    q * count, interpolate linearly from its lower bound; in the +Inf bucket, the highest finite bound."""
    count = buckets[-1][1]
    rank = q * count
    for i, (upper, cumulative) in enumerate(buckets):
        if cumulative >= rank:
            lower, below = (0.0, 0.0) if i == 0 else buckets[i - 1]
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / (cumulative - below)
    raise AssertionError("the +Inf bucket holds every observation")


def test_the_live_p50_is_prometheus_histogram_quantile(page, server):
    import httpx

    for text in ("a", "bb", "ccc", "a photo"):
        httpx.post(server.url + "/v1/embed/texts", json={"texts": [text]}, timeout=60)
    open_page(page, server.url)
    metrics = httpx.get(server.url + "/metrics").text
    buckets: dict[float, float] = {}
    for line in metrics.splitlines():
        if line.startswith("mlxclip_request_latency_seconds_bucket") and 'route="/v1/' in line:
            bound = line.split('le="')[1].split('"')[0]
            bound = float("inf") if bound == "+Inf" else float(bound)
            buckets[bound] = buckets.get(bound, 0.0) + float(line.rsplit(" ", 1)[1])
    expected = _histogram_quantile(0.5, sorted(buckets.items()))
    got = page.evaluate("(text) => { const p = window.mlxclipPage; "
                        "return p.histogramQuantile(0.5, p.latencyBuckets(p.parseMetrics(text))); }", metrics)
    assert got == pytest.approx(expected, rel=1e-12)


def test_typed_words_show_the_nearest_image_first(page, server, photos, reference):
    query = "a photo of a flower"
    text = embed("tiny", texts=[query], out=photos[0].parent.parent / "query.npz")["text_embeds"][0]
    scores = reference @ text
    expected = [photos[i].name for i in np.argsort(-scores, kind="stable")]
    open_page(page, server.url)
    page.fill("#k", "4")
    page.fill("#query", query)
    page.click("#search-form button")
    shown = shown_results(page)
    assert [r["path"] for r in shown] == expected[:4]
    # The same float32 engine and preprocessing; only a batch's summation order differs (< 1e-6).
    np.testing.assert_allclose([r["score"] for r in shown], np.sort(scores)[::-1][:4], atol=1e-5)
    assert f"cosine {np.sort(scores)[::-1][0]:.4f}" in shown[0]["text"]
    with Image.open(photos[[p.name for p in photos].index(expected[0])]) as original:
        width, height = original.size
    side = max(width, height)  # the longer side becomes 256, the other keeps the aspect ratio (Pillow rounds)
    assert shown[0]["image"] == [round(width * 256 / side), round(height * 256 / side)]


def test_a_dropped_image_finds_itself_first(page, server, photos):
    open_page(page, server.url)
    drop_file(page, "#search-drop", photos[4])
    shown = shown_results(page)
    assert shown[0]["path"] == photos[4].name and shown[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert len(shown) == len(photos)  # k defaults to 12, the index holds 6


def test_a_dropped_image_gets_the_right_label_highest(page, server, photos, reference):
    labels = ["a cat", "a temple by a lake", "a flower", "a red car"]
    texts = embed("tiny", texts=[f"a photo of {x}." for x in labels],
                  out=photos[0].parent.parent / "labels.npz")["text_embeds"]
    logits = 100.0 * reference[0].astype(np.float64) @ texts.T.astype(np.float64)
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    open_page(page, server.url)
    page.fill("#labels", "\n".join(labels))
    page.fill("#templates", "a photo of {}.")
    drop_file(page, "#classify-drop", photos[0])
    page.wait_for_selector("#bars li")
    bars = page.eval_on_selector_all("#bars li", """items => items.map((li) => [li.dataset.label,
        parseFloat(li.dataset.probability), li.classList.contains('best'),
        li.querySelector('.fill').getBoundingClientRect().width / li.querySelector('.track').getBoundingClientRect().width])""")
    best = labels[int(np.argmax(expected))]
    assert bars[0][0] == best and bars[0][2], bars  # the highest bar first, marked
    got = dict((label, p) for label, p, _, _ in bars)
    np.testing.assert_allclose([got[x] for x in labels], expected, atol=1e-4)  # 100x scale amplifies 1e-6
    for label, p, _, drawn in bars:  # each bar's length is its probability
        assert drawn == pytest.approx(p, abs=0.01), (label, p, drawn)


def test_a_wrong_key_is_said_and_the_right_one_kept(page, guarded_server):
    page.goto(guarded_server.url + "/")
    page.wait_for_selector("#key-form:not([hidden])")
    assert "needs an API key" in page.inner_text("#key-message")
    page.fill("#key-input", "not-the-key")
    page.click("#key-form button")
    expect(page.locator("#key-message")).to_contain_text("refused")
    assert page.locator("#card-info dd").count() == 0
    page.fill("#key-input", API_KEY)
    page.click("#key-form button")
    page.wait_for_selector("#card-info dd")
    assert page.locator("#key-form").is_hidden()
    assert page.evaluate("sessionStorage.getItem('mlxclip-api-key')") == API_KEY
    page.reload()  # kept for the tab: no second prompt
    page.wait_for_selector("#card-info dd")
    assert page.locator("#key-form").is_hidden()


def test_no_index_and_a_huge_upload_are_said_plainly(page, guarded_server, photos):
    page.goto(guarded_server.url + "/")
    page.evaluate(f"sessionStorage.setItem('mlxclip-api-key', '{API_KEY}')")
    open_page(page, guarded_server.url)
    assert page.locator("#no-index").is_visible() and "--index" in page.inner_text("#no-index")
    assert page.locator("#query").is_disabled()
    big = photos[0]
    assert big.stat().st_size > SMALL_BODY_MB * 2 ** 20
    page.set_input_files("#classify-file", str(big))
    page.wait_for_selector("#message:not([hidden])")
    message = page.inner_text("#message")
    assert "413" in message and "exceeds the limit" in message, message
    assert page.locator("#bars li").count() == 0


def test_no_ui_serves_only_the_api(tmp_path):
    import httpx

    proc = ServerProcess("--model", "tiny", "--no-ui")
    try:
        assert httpx.get(proc.url + "/").status_code == 404
        assert httpx.get(proc.url + "/ui/app.js").status_code == 404
        assert httpx.get(proc.url + "/info").status_code == 200
    finally:
        proc.stop()
