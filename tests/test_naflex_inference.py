"""NaFlex SigLIP 2 through the inference commands (`load`, `mlxclip embed`, the server, `mlxclip
index`, `mlxclip eval`), each with `--max-num-patches`, held to transformers itself.

The model folder is a random `transformers.Siglip2Model` of unusual sizes (patch 4, a 4x4 position
grid, 3 heads) written by `save_pretrained`, with the built-in siglip2-naflex-tiny's tokenizer and
a preprocessor_config.json whose budget (40 patches) is neither the grid's (16) nor a square. The
reference reads the same folder and image files with `Siglip2Model.from_pretrained` and
`Siglip2ImageProcessorPil.from_pretrained`: `get_image_features`, L2-normalised.

Photos: scikit-image's sample images (shipped in its wheel), some cropped to thin strips, so every
image of a batch has its own patch grid and most are padded.
"""

from __future__ import annotations

import mlx_clip  # noqa: F401  (BLAS loader first)

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from PIL import Image

from mlx_clip.cli import main

# Max |difference| of unit embeddings from transformers' (float32), measured on this machine at
# budgets 40 (the folder's), 23 and 31: MLX engine 1.6e-7 (`load`, `mlxclip index`), torch engine
# 3.0e-8; the server (its batch padded to 8 rows) 1.0e-7 with MLX, 7.5e-8 with torch.
TOL = 2e-6
PATCH = 4
FOLDER_BUDGET = 40  # the folder's preprocessor_config.json
ODD_BUDGET = 23
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def hf_siglip2(vocab_size: int):
    """Unusual sizes (`test_naflex.py`'s builder: biases, norms, scale and bias moved off
    transformers' constant starts), with the built-in tokenizer's vocabulary."""
    from tests.test_naflex import hf_siglip2 as build

    return build(3, {"text": dict(vocab_size=vocab_size, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                                  num_attention_heads=5, max_position_embeddings=11, projection_size=48),
                     "vision": dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3,
                                    patch_size=PATCH, num_patches=16)})


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    from mlx_clip.api import resolve
    from mlx_clip.convert.writer import write_naflex_preprocessor_config
    from mlx_clip.model.tokenizer import load_tokenizer

    builtin = resolve("siglip2-naflex-tiny")
    out = tmp_path_factory.mktemp("naflex") / "model"
    hf_siglip2(load_tokenizer(builtin).vocab_size).save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(builtin / name, out / name)
    write_naflex_preprocessor_config(out, PATCH, FOLDER_BUDGET)
    return out


def real_photos() -> dict[str, Image.Image]:
    """Square, wide, a tall strip, a wide strip, a tall crop: five patch grids at every budget here."""
    import skimage.data

    load = lambda name: Image.fromarray(getattr(skimage.data, name)())  # noqa: E731
    return {"astronaut.png": load("astronaut"), "rocket.jpg": load("rocket"),
            "coffee-strip.png": load("coffee").crop((0, 0, 90, 400)),
            "chelsea-strip.webp": load("chelsea").crop((0, 100, 451, 112)),
            "chelsea-tall.jpg": load("chelsea").crop((130, 0, 280, 300))}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("photos")
    paths = []
    for name, image in real_photos().items():
        image.save(out / name, quality=95) if name.endswith((".jpg", ".webp")) else image.save(out / name)
        paths.append(out / name)
    return sorted(paths)


@pytest.fixture(scope="module")
def reference(folder, photos):
    """budget (None: the folder's, as transformers reads it) -> the photos' unit image features."""
    from transformers import Siglip2ImageProcessorPil, Siglip2Model

    model = Siglip2Model.from_pretrained(folder).eval()
    processor = Siglip2ImageProcessorPil.from_pretrained(folder)
    images = [Image.open(p).convert("RGB") for p in photos]
    cache = {}

    def features(budget: int | None) -> np.ndarray:
        if budget not in cache:
            kwargs = {} if budget is None else {"max_num_patches": budget}
            inputs = processor(images, return_tensors="pt", **kwargs)
            # The batch exercises what NaFlex is for: a grid per aspect ratio, padding in most rows.
            assert len({tuple(s) for s in inputs["spatial_shapes"].tolist()}) == len(images)
            assert int(inputs["pixel_attention_mask"].sum(1).min()) < inputs["pixel_attention_mask"].shape[1]
            with torch.no_grad():
                out = model.get_image_features(**inputs).pooler_output.numpy()
            cache[budget] = out / np.linalg.norm(out, axis=1, keepdims=True)
        return cache[budget]

    return features


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def cli(*args) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(res: Result, *needles: str) -> None:
    assert res.exit_code == 2, res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output
    for needle in needles:
        assert needle in lines[0], lines[0]


# ------------------------------------------------------------------------------ the Python API

@pytest.mark.parametrize("backend", ["mlx", "torch"])
@pytest.mark.parametrize("budget", [None, ODD_BUDGET])
def test_load_encodes_images_as_transformers(folder, photos, reference, backend, budget):
    from mlx_clip.api import load

    clip = load(folder, backend, max_num_patches=budget)
    assert clip.max_num_patches == (budget or FOLDER_BUDGET)
    got = clip.encode_images(photos)
    assert max_abs(got, reference(budget)) <= TOL
    # The two budgets give embeddings far apart, so each comparison above tells them apart.
    assert max_abs(reference(ODD_BUDGET), reference(None)) > 100 * TOL


# ---------------------------------------------------------------------------- mlxclip embed

def test_embed_cli_writes_the_budgets_embeddings(folder, photos, reference, tmp_path):
    out = tmp_path / "e.npz"
    res = cli("embed", "--model", folder, *[a for p in photos for a in ("--image", p)], "--text", "a cat",
              "--max-num-patches", ODD_BUDGET, "--out", out)
    assert res.exit_code == 0, res.output
    with np.load(out) as data:
        assert max_abs(data["image_embeds"], reference(ODD_BUDGET)) <= TOL
        assert data["text_embeds"].shape == (1, 48)


@pytest.mark.parametrize("command", ["embed", "index", "eval"])
def test_a_budget_for_a_clip_model_is_refused_in_one_line(command, photos, tmp_path):
    outputs = {"embed": tmp_path / "e.npz", "index": tmp_path / "idx", "eval": tmp_path / "r.json"}
    args = {"embed": lambda: ["--image", photos[0]],
            "index": lambda: [photos[0].parent],
            "eval": lambda: ["--data", class_folders(photos, tmp_path / "classes")]}[command]()
    res = cli(command, *args, "--model", "tiny", "--max-num-patches", 30, "--out", outputs[command])
    assert_one_line_error(res, "--max-num-patches 30", "NaFlex", "'clip'")
    assert not outputs[command].exists()


# ---------------------------------------------------------------------------------- the server

class InProcessServer:
    """`create_app` behind starlette's TestClient: the app's lifespan loads the model in the
    background, as under uvicorn; entering waits until /health no longer says "loading"."""

    def __init__(self, **settings):
        from fastapi.testclient import TestClient

        from mlx_clip.serve.app import create_app
        from mlx_clip.serve.service import ServeSettings

        self.client = TestClient(create_app(ServeSettings(**settings)))

    def __enter__(self):
        self.client.__enter__()
        deadline = time.monotonic() + 60
        while (health := self.client.get("/health")).json().get("type") == "loading":
            assert time.monotonic() < deadline, "the model did not load in 60 s"
            time.sleep(0.05)
        self.health = health
        return self.client

    def __exit__(self, *exc):
        return self.client.__exit__(*exc)


def upload(paths: list[Path], field: str = "files") -> list:
    return [(field, (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_server_embeds_each_aspect_ratio_as_transformers_and_searches(folder, photos, reference, backend, tmp_path):
    from mlx_clip.index import build_index

    index = tmp_path / "idx"
    build_index(photos[0].parent, folder, index, backend=backend, max_num_patches=ODD_BUDGET, progress=False)
    server = InProcessServer(model=str(folder), backend=backend, max_num_patches=ODD_BUDGET, index=index, ui=False)
    with server as client:
        assert server.health.json() == {"status": "ok"}
        info = client.get("/info").json()
        assert info["max_num_patches"] == ODD_BUDGET and info["embedding_dim"] == 48
        got = client.post("/v1/embed/images", files=upload(photos))
        assert got.status_code == 200, got.text
        assert max_abs(got.json()["embeddings"], reference(ODD_BUDGET)) <= TOL
        strip = photos.index(photos[0].parent / "coffee-strip.png")
        found = client.post("/v1/search", files=upload([photos[strip]], "file"), data={"k": "3"})
        assert found.status_code == 200, found.text
        results = found.json()["results"]
        assert results[0]["path"] == "coffee-strip.png" and results[0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_an_index_embedded_at_another_budget_is_refused_by_the_server(folder, photos, tmp_path):
    from mlx_clip.index import build_index

    index = tmp_path / "idx"
    build_index(photos[0].parent, folder, index, max_num_patches=ODD_BUDGET, progress=False)
    with InProcessServer(model=str(folder), index=index, ui=False) as client:  # the folder's budget, 40
        health = client.get("/health")
        assert health.status_code == 503
        message = health.json()["error"]
        assert f"--max-num-patches {ODD_BUDGET}, the server embeds at {FOLDER_BUDGET}" in message
        assert "\n" not in message


def test_server_with_a_budget_for_a_clip_model_reports_why_it_did_not_load():
    with InProcessServer(model="tiny", max_num_patches=30, ui=False) as client:
        health = client.get("/health")
        assert health.status_code == 503
        message = health.json()["error"]
        assert "--max-num-patches 30" in message and "\n" not in message


def test_serve_cli_passes_the_budget_to_the_server(monkeypatch):
    import mlx_clip.serve.server
    from mlx_clip.errors import ConfigError

    seen = []

    def run(settings, **kwargs):
        seen.append(settings)
        # Returning would end the process (the command's os._exit after a clean shutdown).
        raise ConfigError("not started")

    monkeypatch.setattr(mlx_clip.serve.server, "serve", run)
    res = cli("serve", "--model", "siglip2-naflex-tiny", "--max-num-patches", 30)
    assert res.exit_code == 2 and "not started" in res.output
    assert seen[0].max_num_patches == 30


# ------------------------------------------------------------------------------- mlxclip index

def index_meta(out: Path) -> dict:
    return json.loads((out / "index.json").read_text())


def test_index_records_its_budget_and_a_rebuild_with_another_reembeds(folder, photos, reference, tmp_path):
    from mlx_clip.api import load
    from mlx_clip.index import ImageIndex

    root, out = photos[0].parent, tmp_path / "idx"
    n = len(photos)

    def build(*budget) -> str:
        res = cli("index", root, "--model", folder, "--out", out, *budget)
        assert res.exit_code == 0, res.output
        return res.output

    def rows() -> np.ndarray:
        index = ImageIndex.load(out, expect_model=folder)
        assert index.paths == [p.name for p in photos]
        return index.embeddings

    assert f"{n} images ({n} embedded, 0 unchanged" in build("--max-num-patches", ODD_BUDGET)
    assert index_meta(out)["max_num_patches"] == ODD_BUDGET
    assert max_abs(rows(), reference(ODD_BUDGET)) <= TOL
    assert f"(0 embedded, {n} unchanged" in build("--max-num-patches", ODD_BUDGET)

    # Without the flag the folder's budget is in effect: another budget, every row embedded again.
    assert f"({n} embedded, 0 unchanged" in build()
    assert index_meta(out)["max_num_patches"] == FOLDER_BUDGET
    assert max_abs(rows(), reference(None)) <= TOL
    # Naming the folder's budget is the same input: reused.
    assert f"(0 embedded, {n} unchanged" in build("--max-num-patches", FOLDER_BUDGET)

    # Search: each photo's own row comes first.
    clip = load(folder)
    scores, found = ImageIndex.load(out).search(clip.encode_images(photos), k=2)
    assert found[:, 0].tolist() == list(range(n)) and np.allclose(scores[:, 0], 1.0, atol=1e-5)


# -------------------------------------------------------------------------------- mlxclip eval

def class_folders(photos: list[Path], root: Path) -> Path:
    """Three classes of real photos, three crops each (every one its own aspect ratio)."""
    boxes = ((0, 0, 1, 1), (0, 0, 0.5, 1), (0.2, 0.4, 1, 0.6))
    for name in ("astronaut", "rocket", "coffee"):
        (root / name).mkdir(parents=True, exist_ok=True)
    sources = {"astronaut": photos[0].parent / "astronaut.png", "rocket": photos[0].parent / "rocket.jpg",
               "coffee": photos[0].parent / "coffee-strip.png"}
    for name, source in sources.items():
        with Image.open(source) as image:
            w, h = image.size
            for i, (x0, y0, x1, y1) in enumerate(boxes):
                image.convert("RGB").crop((int(x0 * w), int(y0 * h), int(x1 * w), int(y1 * h))).save(
                    root / name / f"{i}.png")
    return root


def test_eval_zero_shot_and_compare_run_with_a_budget(folder, photos, tmp_path, monkeypatch):
    import mlx_clip.evaluation.evaluate as ev

    budgets, real_load = [], ev.load

    def load(*args, **kwargs):  # records each loaded model's budget: the flag reached it
        clip = real_load(*args, **kwargs)
        budgets.append(clip.max_num_patches)
        return clip

    monkeypatch.setattr(ev, "load", load)
    data = class_folders(photos, tmp_path / "classes")
    res = cli("eval", "--model", folder, "--data", data, "--max-num-patches", ODD_BUDGET, "--out", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    assert "zeroshot_classification: acc1 " in res.output
    results = json.loads((tmp_path / "r.json").read_text())
    assert [r["task"] for r in results] == ["zeroshot_classification"]
    assert results[0]["images"] == 9 and results[0]["class_names"] == ["astronaut", "coffee", "rocket"]
    assert 0.0 <= results[0]["metrics"]["acc1"] <= 1.0
    assert (tmp_path / "r.md").is_file()

    res = cli("eval", "--compare", folder, folder, "--data", data, "--max-num-patches", ODD_BUDGET,
              "--out", tmp_path / "compare")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "compare" / "compare.md").is_file()
    assert budgets == [ODD_BUDGET] * 3
