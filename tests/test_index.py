"""`mlxclip index`: embeddings equal `mlxclip embed`, incremental rebuilds, bad images counted,
exact blocked search equal to a full sort."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import mlx_clip.index as index_module
from mlx_clip.cli import main
from mlx_clip.embed import embed
from mlx_clip.index import ImageIndex, build_index
from tests.serve_helpers import encode, photo_variants


@pytest.fixture
def photos(tmp_path):
    paths = photo_variants(tmp_path / "images")
    (tmp_path / "images" / "sub").mkdir()
    nested = tmp_path / "images" / "sub" / "again.jpg"
    nested.write_bytes(paths[0].read_bytes())
    (tmp_path / "images" / "broken.jpg").write_bytes(b"<html>not an image</html>")
    (tmp_path / "images" / "notes.txt").write_text("ignored: not an image extension")
    return sorted(paths + [nested])


def _embedded(index: ImageIndex, folder) -> dict[str, np.ndarray]:
    return dict(zip(index.paths, index.embeddings))


def test_index_equals_embed_and_counts_bad_images(photos, tmp_path):
    root = tmp_path / "images"
    report = build_index(root, "tiny", tmp_path / "idx", progress=False)
    assert (report.images, report.embedded, report.reused, report.removed) == (7, 7, 0, 0)
    assert [p for p, _ in report.bad] == ["broken.jpg"]
    assert "broken.jpg" in (tmp_path / "idx" / "bad_images.txt").read_text()
    index = ImageIndex.load(tmp_path / "idx")
    assert index.paths == sorted(p.relative_to(root).as_posix() for p in photos)
    expected = embed("tiny", images=[root / p for p in index.paths], out=tmp_path / "e.npz")["image_embeds"]
    np.testing.assert_allclose(index.embeddings, expected, atol=1e-6)


def test_rebuild_embeds_only_what_changed(photos, tmp_path):
    root, out = tmp_path / "images", tmp_path / "idx"
    build_index(root, "tiny", out, progress=False)
    first = _embedded(ImageIndex.load(out), root)

    again = build_index(root, "tiny", out, progress=False)
    assert (again.embedded, again.reused, again.removed) == (0, 7, 0)

    (root / "flower-0.png").unlink()
    (root / "china.jpg").write_bytes((root / "flower.jpg").read_bytes())  # changed content and size
    (root / "new.png").write_bytes((root / "china-0.png").read_bytes())
    changed = build_index(root, "tiny", out, progress=False)
    assert (changed.images, changed.embedded, changed.reused, changed.removed) == (7, 2, 5, 1)
    now = _embedded(ImageIndex.load(out), root)
    assert "flower-0.png" not in now and "new.png" in now
    np.testing.assert_allclose(now["china.jpg"], first["flower.jpg"], atol=1e-6)
    np.testing.assert_array_equal(now["sub/again.jpg"], first["sub/again.jpg"])  # reused, not recomputed


def test_a_different_model_rebuilds_everything(photos, tmp_path):
    root, out = tmp_path / "images", tmp_path / "idx"
    build_index(root, "tiny", out, progress=False)
    other = build_index(root, "small", out, progress=False)
    assert (other.embedded, other.reused) == (7, 0)
    with pytest.raises(Exception, match="another model"):
        from mlx_clip.api import resolve

        ImageIndex.load(out, expect_model=resolve("tiny"))


def test_an_interrupted_build_keeps_what_it_embedded(photos, tmp_path, monkeypatch):
    root, out = tmp_path / "images", tmp_path / "idx"
    monkeypatch.setattr(index_module, "FLUSH_EVERY", 10 ** 9)
    from mlx_clip.api import CLIP

    real = CLIP.preprocess
    seen = []

    def failing(self, images):
        seen.append(images)
        if len(seen) == 5:
            raise KeyboardInterrupt
        return real(self, images)

    monkeypatch.setattr(CLIP, "preprocess", failing)
    with pytest.raises(KeyboardInterrupt) as caught:
        build_index(root, "tiny", out, progress=False, batch_size=1)
    kept = ImageIndex.load(out)
    # Files in order: broken.jpg (refused from its bytes, never decoded), then images: the 5th decode
    # is interrupted, and the four before it are written on the way out, whatever FLUSH_EVERY says.
    assert kept.paths == ["china-0.png", "china-1.webp", "china.jpg", "flower-0.png"]
    assert (caught.value.kept, caught.value.total) == (4, 8)
    monkeypatch.setattr(CLIP, "preprocess", real)
    resumed = build_index(root, "tiny", out, progress=False)
    assert (resumed.reused, resumed.embedded) == (4, 3)


def test_the_index_takes_exactly_the_images_the_server_takes(photos, tmp_path):
    """One list of formats for both: a file is indexed if and only if the server would embed its
    bytes; every other file with an image's name is skipped and counted, with the reason."""
    from PIL import Image

    from mlx_clip.serve.inputs import ApiError, decode_image

    root = tmp_path / "images"
    pixels = Image.open(photos[0]).convert("RGB").resize((32, 24))
    (root / "plain.bmp").write_bytes(encode(pixels, "BMP"))
    (root / "bmp-named.png").write_bytes(encode(pixels, "BMP"))
    (root / "gif-named.jpg").write_bytes(encode(pixels, "GIF"))
    (root / "png-named.jpg").write_bytes(encode(pixels, "PNG"))
    (root / "empty.webp").write_bytes(b"")
    report = build_index(root, "tiny", tmp_path / "idx", progress=False)
    index = ImageIndex.load(tmp_path / "idx")
    served, refused = set(), set()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix != ".txt"):
        try:
            decode_image(path.read_bytes(), path.name, 40_000_000)
            served.add(path.relative_to(root).as_posix())
        except ApiError:
            refused.add(path.relative_to(root).as_posix())
    assert set(index.paths) == served and {p for p, _ in report.bad} == refused
    reasons = dict(report.bad)
    assert "BMP" in reasons["plain.bmp"] and "BMP" in reasons["bmp-named.png"] and "GIF" in reasons["gif-named.jpg"]
    assert "png-named.jpg" in index.paths


def test_a_build_flushes_by_time_so_a_crash_keeps_its_work(photos, tmp_path, monkeypatch):
    root, out = tmp_path / "images", tmp_path / "idx"
    monkeypatch.setattr(index_module, "FLUSH_EVERY", 10 ** 9)  # only the clock flushes
    monkeypatch.setattr(index_module, "FLUSH_SECONDS", 0.0)
    from mlx_clip.api import CLIP

    real, seen = CLIP.preprocess, []

    def crashing(self, images):
        seen.append(images)
        if len(seen) == 5:
            raise RuntimeError("the machine fell over")  # no handler runs: only flushed work survives
        return real(self, images)

    monkeypatch.setattr(CLIP, "preprocess", crashing)
    with pytest.raises(RuntimeError):
        build_index(root, "tiny", out, progress=False, batch_size=1)
    assert ImageIndex.load(out).paths == ["china-0.png", "china-1.webp", "china.jpg", "flower-0.png"]
    monkeypatch.setattr(CLIP, "preprocess", real)
    resumed = build_index(root, "tiny", out, progress=False)
    assert (resumed.reused, resumed.embedded) == (4, 3)


IMAGES_TO_INTERRUPT = 300


def _ignoring_sigint():
    # What a script's background job (`cmd &` in a non-interactive shell) starts with: SIGINT
    # ignored, which Python honours by never raising KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_keeps_the_work_says_so_in_one_line_and_exits_130(tmp_path, stop):
    """Ctrl-C, and SIGTERM as `kill`, `timeout` or a container's stop send it, keep what was embedded;
    also in a process started with SIGINT ignored (a CI script's background job: there the build
    once ran to the end, exit 0, as if the Ctrl-C had not been sent)."""
    root, out = tmp_path / "many", tmp_path / "idx"
    root.mkdir()
    photo = photo_variants(tmp_path / "one")[0].read_bytes()
    for i in range(IMAGES_TO_INTERRUPT):
        (root / f"{i:04d}.jpg").write_bytes(photo)
    proc = subprocess.Popen([sys.executable, "-m", "mlx_clip", "index", str(root), "--model", "tiny", "--out", str(out),
                             "--batch-size", "1"], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            preexec_fn=_ignoring_sigint)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(iter(lambda: proc.stderr.read(1), "")))
    reader.start()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        done = [int(n) for n in re.findall(rf"(\d+)/{IMAGES_TO_INTERRUPT}", "".join(stderr))]
        if done and max(done) >= 10:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the build ended before it could be interrupted: " + "".join(stderr)[-500:]
    proc.send_signal(stop)
    code = proc.wait(timeout=60)
    reader.join()
    err, stdout = "".join(stderr), proc.stdout.read()
    assert code == 130, (code, err[-2000:])
    assert "Traceback" not in err and "Aborted" not in err, err[-2000:]
    last = re.split(r"[\r\n]+", err.strip())[-1]
    match = re.fullmatch(rf"error: interrupted; kept (\d+) of {IMAGES_TO_INTERRUPT} images in (.+); "
                         r"run the same command again to "
                         r"embed the rest", last)
    assert match, (last, stdout)
    kept = int(match.group(1))
    assert 10 <= kept < IMAGES_TO_INTERRUPT and Path(match.group(2)) == out
    assert len(ImageIndex.load(out)) == kept
    resumed = build_index(root, "tiny", out, progress=False)
    assert (resumed.reused, resumed.embedded) == (kept, IMAGES_TO_INTERRUPT - kept)


def test_blocked_search_equals_a_full_sort(monkeypatch, rng):
    rows = rng.standard_normal((1000, 16)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    index = ImageIndex(rows, [{"path": f"{i}.jpg"} for i in range(1000)], {})
    queries = rows[[3, 500]] + 0.1 * rng.standard_normal((2, 16)).astype(np.float32)
    monkeypatch.setattr(index_module, "SEARCH_BLOCK", 77)  # many blocks, the last one short
    scores, found = index.search(queries, 25)
    full = queries @ rows.T
    expected = np.argsort(-full, axis=1, kind="stable")[:, :25]
    np.testing.assert_array_equal(found, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(full, expected, 1), rtol=1e-6)
    assert index.search(queries, 5000)[1].shape == (2, 1000)  # k beyond the index: all of it


def test_cli_reports_counts_and_refuses_bad_folders(photos, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(main, ["index", str(tmp_path / "images"), "--model", "tiny", "--out", str(tmp_path / "idx")])
    assert ok.exit_code == 0, ok.output
    assert "7 images (7 embedded, 0 unchanged, 0 removed), 1 skipped" in ok.output
    missing = runner.invoke(main, ["index", str(tmp_path / "nope"), "--model", "tiny", "--out", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "no such folder" in missing.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    taken = runner.invoke(main, ["index", str(tmp_path / "images"), "--model", "tiny", "--out", str(tmp_path / "full")])
    assert taken.exit_code == 2 and "not an index" in taken.output
    os.remove(tmp_path / "idx" / "embeddings.safetensors")
    with pytest.raises(Exception, match="not an index folder"):
        ImageIndex.load(tmp_path / "idx")
