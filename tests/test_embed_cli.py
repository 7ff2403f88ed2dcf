"""`mlxclip embed` end to end, held to transformers' own pipeline.

The model folder is a random tiny `transformers.CLIPModel` saved with `save_pretrained`, plus our
tokenizer files and a `CLIPImageProcessorPil` config saved by transformers. The reference embeds
the same files with `CLIPImageProcessorPil` (PIL resize/crop, as the original CLIP preprocessing),
`CLIPTokenizer` and `get_image_features` / `get_text_features`.

Tolerances (max abs difference over unit vectors, float32):
- MLX engine vs torch engine: 1e-5 (same pixels and ids; only the kernels differ);
- either engine vs transformers: 1e-4 (our PIL transform vs CLIPImageProcessorPil adds float32
  rounding in the normalisation on top of the kernels).
"""

import mlx_clip  # noqa: F401  (BLAS loader first)

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from PIL import Image

from mlx_clip.cli import main
from mlx_clip.model.tokenizer import load_tokenizer
from tests.helpers import save_hf, tiny_hf_clip

ENGINE_TOL = 1e-5
REFERENCE_TOL = 1e-4
TEXTS = ["a photo of a cat", "Two DOGS   on a sofa!", "x-ray of a hand, lateral view"]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = save_hf(tiny_hf_clip(seed=5), tmp_path_factory.mktemp("embed") / "model")
    load_tokenizer().save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three different sizes and aspect ratios, PNG and JPEG, RGB and grayscale."""
    rng = np.random.default_rng(7)
    folder = tmp_path_factory.mktemp("images")
    specs = [("wide.png", (40, 56), "RGB"), ("tall.jpg", (72, 45), "RGB"), ("gray.png", (33, 33), "L")]
    paths = []
    for name, (h, w), mode in specs:
        # Smooth gradients plus noise: resampling differences show up, unlike on flat colour.
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], axis=-1)
        pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels).convert(mode)
        image.save(folder / name, quality=95) if name.endswith(".jpg") else image.save(folder / name)
        paths.append(folder / name)
    return paths


def run_embed(*args) -> Result:
    return CliRunner().invoke(main, ["embed", *map(str, args)])


def embed_args(model: Path, images: list[Path], out: Path, backend: str) -> list:
    args = ["--model", model, "--out", out, "--backend", backend]
    for path in images:
        args += ["--image", path]
    for text in TEXTS:
        args += ["--text", text]
    return args


@pytest.fixture(scope="module")
def outputs(model_folder, images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("out")
    result = {}
    for backend in ("mlx", "torch"):
        out = folder / backend / "embeds.npz"  # a missing parent folder is created
        res = run_embed(*embed_args(model_folder, images, out, backend))
        assert res.exit_code == 0, res.output
        assert res.stdout.strip() == f"wrote {out}: image_embeds (3, 16), text_embeds (3, 16)"
        with np.load(out) as data:
            result[backend] = dict(data)
    return result


@torch.no_grad()
def transformers_embeddings(folder: Path, image_paths: list[Path], texts: list[str]):
    import transformers
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    model = transformers.CLIPModel.from_pretrained(folder).eval()
    processor = CLIPImageProcessorPil.from_pretrained(folder)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    pixels = processor(images=[Image.open(p).convert("RGB") for p in image_paths], return_tensors="pt")
    tokens = tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt")
    img = model.get_image_features(pixel_values=pixels["pixel_values"])
    txt = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    return unit(img), unit(txt)


def unit(out) -> np.ndarray:
    features = getattr(out, "pooler_output", out)  # transformers 5 may return a model output
    return (features / features.norm(dim=-1, keepdim=True)).numpy()


def test_npz_layout(outputs, images):
    for data in outputs.values():
        assert {"image_embeds", "text_embeds"} <= set(data)
        for key in ("image_embeds", "text_embeds"):
            assert data[key].dtype == np.float32 and data[key].shape == (3, 16)
            np.testing.assert_allclose(np.linalg.norm(data[key], axis=1), 1.0, atol=1e-6)
            # Rows must differ, or "one row per input, in order" would be untestable below.
            assert np.abs(data[key][:, None] - data[key][None]).max(axis=-1)[~np.eye(3, dtype=bool)].min() > 1e-3
        assert data["images"].tolist() == [str(p) for p in images]
        assert data["texts"].tolist() == TEXTS


def test_engines_agree(outputs):
    for key in ("image_embeds", "text_embeds"):
        assert np.abs(outputs["mlx"][key] - outputs["torch"][key]).max() <= ENGINE_TOL


def test_equal_to_transformers_pipeline(outputs, model_folder, images):
    img, txt = transformers_embeddings(model_folder, images, TEXTS)
    for data in outputs.values():
        assert np.abs(data["image_embeds"] - img).max() <= REFERENCE_TOL
        assert np.abs(data["text_embeds"] - txt).max() <= REFERENCE_TOL


def test_texts_only_and_images_only(model_folder, images, tmp_path):
    res = run_embed("--model", model_folder, "--text", "a cat", "--out", tmp_path / "t.npz")
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "t.npz") as data:
        assert data["text_embeds"].shape == (1, 16) and data["image_embeds"].shape == (0, 16)
        assert data["image_embeds"].dtype == np.float32


# --- bad input: exit code 2, one line `error: …` naming the culprit, no traceback, no output file ---


def bad_model(kind: str, good: Path, tmp_path: Path) -> Path:
    folder = Path(shutil.copytree(good, tmp_path / "model"))
    weights = folder / "model.safetensors"
    if kind == "bert-config":
        import transformers

        (folder / "config.json").write_text(json.dumps(transformers.BertConfig().to_dict()))
    elif kind == "corrupt-weights":
        weights.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "truncated-header":
        weights.write_bytes(weights.read_bytes()[:64])
    elif kind == "shape-mismatch":
        config = json.loads((folder / "config.json").read_text())
        config["vision_config"]["hidden_size"] = 48
        (folder / "config.json").write_text(json.dumps(config))
    return folder


MODEL_ERRORS = {
    "bert-config": r"config\.json.*not a CLIP, SigLIP or SigLIP 2 config.*bert",
    "corrupt-weights": r"model\.safetensors: not a valid safetensors file",
    "truncated-header": r"model\.safetensors: .*truncated",
    "shape-mismatch": r"model\.safetensors: tensor vision_model\..* has shape .*, expected ",
}


def assert_domain_error(res, pattern: str, out: Path) -> None:
    assert res.exit_code == 2, res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in res.output and res.stdout == ""
    assert not out.exists()


@pytest.mark.parametrize("backend", ["mlx", "torch"])
@pytest.mark.parametrize("kind", list(MODEL_ERRORS))
def test_bad_model_folder(kind, backend, model_folder, images, tmp_path):
    folder = bad_model(kind, model_folder, tmp_path)
    out = tmp_path / "e.npz"
    res = run_embed(*embed_args(folder, images[:1], out, backend))
    assert_domain_error(res, str(folder).replace(".", r"\.") + "/" + MODEL_ERRORS[kind], out)


def test_missing_model_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    res = run_embed("--model", missing, "--text", "a", "--out", tmp_path / "e.npz")
    assert_domain_error(res, rf"^error: {missing}: no such folder", tmp_path / "e.npz")


def test_bad_image_files(model_folder, images, tmp_path):
    text_file = tmp_path / "notes.png"
    text_file.write_text("this is not an image\n")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(images[1].read_bytes()[:300])
    for bad in (text_file, truncated, tmp_path / "absent.jpg"):
        out = tmp_path / "e.npz"
        res = run_embed("--model", model_folder, "--image", images[0], "--image", bad, "--out", out)
        assert_domain_error(res, rf"^error: cannot read image .*{bad.name}", out)


def test_no_inputs_and_wrong_suffix(model_folder, tmp_path):
    res = run_embed("--model", model_folder, "--out", tmp_path / "e.npz")
    assert_domain_error(res, r"^error: nothing to embed: give at least one --image or --text$", tmp_path / "e.npz")
    res = run_embed("--model", model_folder, "--text", "a", "--out", tmp_path / "e.json")
    assert_domain_error(res, rf"^error: --out must end in \.npz, got {tmp_path}/e\.json$", tmp_path / "e.json")


def test_console_script_prints_one_line(model_folder, tmp_path):
    """The installed `mlxclip` entry point, in a fresh process: stderr is the one line, nothing else."""
    folder = bad_model("truncated-header", model_folder, tmp_path)
    script = Path(sys.executable).with_name("mlxclip")
    if not script.exists():
        pytest.skip("mlxclip console script not installed in this environment")
    proc = subprocess.run([str(script), "embed", "--model", str(folder), "--text", "a", "--out",
                           str(tmp_path / "e.npz")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {folder}/model.safetensors: "), proc.stderr
