"""`mlxclip export MODEL --to onnx OUT_DIR`, held to the torch engine by onnxruntime (a runtime we
did not write) on two model configs, at batch sizes the graphs were not traced with.

Tolerance: 1e-5 absolute on L2-normalised float32 embeddings (entries <= 1). onnxruntime and torch
run the same float32 ops and differ only in summation order and kernel fusion (~1e-7 measured);
a wrong input layout, pooling position or weight moves entries by ~1e-1.
"""

import mlx_clip  # noqa: F401  (BLAS loader first)

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx  # the `test` extra installs `mlxclip[export]`
import onnxruntime
import pytest
import torch
from click.testing import CliRunner

from mlx_clip import export as export_module
from mlx_clip.api import load, resolve
from mlx_clip.cli import main
from mlx_clip.errors import ConvertError
from mlx_clip.export import IMAGE_FILE, SPEC_FILE, TEXT_FILE, TRACE_BATCH, export_onnx
from mlx_clip.model.tokenizer import load_tokenizer, trim_padding
from tests.helpers import hf_clip, random_pixels, random_tokens, save_hf

TOL = 1e-5
BATCHES = (1, 5)  # neither is TRACE_BATCH: the batch axis must really be dynamic
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
CAPTIONS = ["a photo of a cat", "two dogs", "a red square on a blue background, seen from far away", "x", "ok"]

# Sizes nothing else uses: odd head widths (16 and 8), a 40 px image of 10 px patches, a 24-token
# context, a 1000-token vocabulary, gelu, and the legacy eos_token_id 2 (pooling at argmax(ids)).
ODD_TEXT = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=3, vocab_size=1000,
                max_position_embeddings=24, hidden_act="gelu", eos_token_id=2, bos_token_id=0, pad_token_id=1)
ODD_VISION = dict(hidden_size=40, intermediate_size=72, num_hidden_layers=3, num_attention_heads=5, image_size=40,
                  patch_size=10, hidden_act="gelu")


def perturb(model, seed):
    """Random-init CLIPs have LayerNorm weights 1 and biases 0: move every parameter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory):
    model = perturb(hf_clip(3, ODD_TEXT, ODD_VISION, projection_dim=24), seed=4)
    return save_hf(model, tmp_path_factory.mktemp("odd") / "model")  # weights + config only


@pytest.fixture(scope="module")
def exports(odd_folder, tmp_path_factory):
    """{name: (model folder, export folder)}: `tiny` through the CLI, over a non-empty folder with
    --overwrite; the odd config through the Python function."""
    root = tmp_path_factory.mktemp("exports")
    tiny_out = root / "tiny"
    tiny_out.mkdir()
    (tiny_out / "stale.txt").write_text("replaced")
    res = CliRunner().invoke(main, ["export", "tiny", "--to", "onnx", str(tiny_out), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == f"wrote {tiny_out}"
    odd_out = export_onnx(odd_folder, root / "odd")
    return {"tiny": (resolve("tiny"), tiny_out), "odd": (odd_folder, odd_out)}


def session(path: Path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def token_batches(name: str, clip, rng) -> list[np.ndarray]:
    """Full-context random ids and a trimmed batch, as `mlx_clip.load(...).encode_texts` sends."""
    t = clip.config.text_config
    if t.eos_token_id == 2:  # legacy pooling: the EOT must be the row's largest id
        ids = [random_tokens(rng, b, vocab=t.vocab_size, length=t.max_position_embeddings, eot=t.vocab_size - 1,
                             sot=t.vocab_size - 2) for b in BATCHES]
    else:
        ids = [random_tokens(rng, b, vocab=t.vocab_size, length=t.max_position_embeddings,
                             eot=t.eos_token_id, sot=t.bos_token_id) for b in BATCHES]
    if name == "tiny":  # the real tokenizer's rows, trimmed to a multiple of 8
        ids.append(trim_padding(clip.tokenizer.encode(CAPTIONS)))
    return ids


@pytest.mark.parametrize("name", ["tiny", "odd"])
def test_onnxruntime_equals_the_torch_engine(name, exports, capsys):
    folder, out = exports[name]
    clip = load(folder, backend="torch", device="cpu")
    rng = np.random.default_rng(7)
    image, text = session(out / IMAGE_FILE), session(out / TEXT_FILE)
    worst = {"image": 0.0, "text": 0.0}
    for batch in BATCHES:
        pixels = random_pixels(rng, batch, clip.image_size)
        got = image.run(["image_embeds"], {"pixel_values": pixels})[0]
        want = clip.engine.encode_images(pixels)
        assert got.shape == want.shape == (batch, clip.config.projection_dim) and got.dtype == np.float32
        worst["image"] = max(worst["image"], float(np.abs(got - want).max()))
    for ids in token_batches(name, clip, rng):
        got = text.run(["text_embeds"], {"input_ids": ids})[0]
        want = clip.engine.encode_texts(ids)
        assert got.shape == want.shape == (len(ids), clip.config.projection_dim)
        worst["text"] = max(worst["text"], float(np.abs(got - want).max()))
    with capsys.disabled():
        print(f"\n{name}: max |onnxruntime - torch| image {worst['image']:.2e}, text {worst['text']:.2e}")
    assert worst["image"] <= TOL and worst["text"] <= TOL, worst
    # The graphs' own outputs are unit vectors, as the engine's are.
    assert np.allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny", "odd"])
def test_files_and_description(name, exports):
    folder, out = exports[name]
    clip = load(folder, backend="torch", device="cpu")
    names = {p.name for p in out.iterdir()}
    assert {IMAGE_FILE, TEXT_FILE, SPEC_FILE, "preprocessor_config.json", *TOKENIZER_FILES} == names
    assert not list(out.parent.glob(f".{out.name}.*")), "staging folder left behind"
    for file, input_name in ((IMAGE_FILE, "pixel_values"), (TEXT_FILE, "input_ids")):
        model = onnx.load(str(out / file))
        onnx.checker.check_model(model, full_check=True)
        (graph_input,) = model.graph.input
        assert graph_input.name == input_name
        assert graph_input.type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
    spec = json.loads((out / SPEC_FILE).read_text())
    size = clip.image_size
    assert spec["image_encoder"]["input"]["shape"] == ["batch", size, size, 3]
    assert spec["image_encoder"]["input"]["layout"] == "NHWC"
    assert spec["text_encoder"]["input"]["max_sequence"] == clip.config.text_config.max_position_embeddings
    assert spec["opset"] == export_module.OPSET and spec["verification"]["trace_batch"] == TRACE_BATCH
    assert max(spec["verification"]["max_abs_diff"].values()) <= TOL
    assert spec["logit_scale"] == pytest.approx(float(clip.engine.model.logit_scale.detach()))
    assert spec["image_encoder"]["input"]["image_mean"] == pytest.approx(clip.mean)
    # The tokenizer files give the ids the toolkit's tokenizer gives (the odd folder had none).
    assert np.array_equal(load_tokenizer(out).encode(CAPTIONS), clip.tokenizer.encode(CAPTIONS))
    if name == "tiny":
        for copied in ("tokenizer.json", "preprocessor_config.json"):
            assert (out / copied).read_bytes() == (folder / copied).read_bytes()


# --- refusals: exit code 2, one line `error: …`, no traceback, OUT_DIR untouched ----------------


def run_export(*args):
    return CliRunner().invoke(main, ["export", *map(str, args)])


def assert_one_error_line(res, pattern: str) -> None:
    assert res.exit_code == 2, res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in res.output and res.stdout == ""


def broken(kind: str, tmp_path: Path) -> Path:
    folder = Path(shutil.copytree(resolve("tiny"), tmp_path / kind))
    weights, config = folder / "model.safetensors", folder / "config.json"
    if kind == "truncated-weights":
        weights.write_bytes(weights.read_bytes()[:-4096])
    elif kind == "config-not-json":
        config.write_text('{"model_type": "clip", ')
    elif kind == "not-clip":
        config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "bert"}))
    return folder


BROKEN = {
    "truncated-weights": r"model\.safetensors: not a valid safetensors file .*truncated",
    "config-not-json": r"config\.json: not valid JSON",
    "not-clip": r"config\.json is not a CLIP, SigLIP or SigLIP 2 config \(model_type='bert'",
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_corrupt_or_unsupported_model(kind, tmp_path):
    folder = broken(kind, tmp_path)
    out = tmp_path / "out"
    assert_one_error_line(run_export(folder, "--to", "onnx", out), BROKEN[kind])
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_non_empty_out_dir_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_error_line(run_export("tiny", "--to", "onnx", out),
                          r"out: destination folder is not empty; .*--overwrite")
    assert_one_error_line(run_export(resolve("tiny"), "--to", "onnx", resolve("tiny"), "--overwrite"),
                          r"destination is the source folder")
    assert_one_error_line(run_export("tiny", "--to", "onnx", tmp_path / "o", "--opset", "17"),
                          r"--opset must be .*>= 18")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_missing_packages_named_with_the_extra(tmp_path, monkeypatch):
    real = export_module.find_spec
    monkeypatch.setattr(export_module, "find_spec", lambda name: None if name == "onnxruntime" else real(name))
    assert_one_error_line(run_export("tiny", "--to", "onnx", tmp_path / "out"),
                          r"needs onnxruntime .*pip install 'mlxclip\[export\]'")


def test_failed_verification_leaves_out_dir_untouched(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    monkeypatch.setattr(export_module, "TOLERANCE", -1.0)  # no difference passes
    with pytest.raises(ConvertError, match=r"verification failed: onnxruntime's image .* left untouched"):
        export_onnx("tiny", out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not list(tmp_path.glob(".out.*"))


def test_console_script_prints_one_line(tmp_path):
    """In a fresh process (nothing imported beforehand), stderr is the one line and nothing else."""
    folder = broken("truncated-weights", tmp_path)
    proc = subprocess.run([sys.executable, "-m", "mlx_clip", "export", str(folder), "--to", "onnx",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {folder}/model.safetensors: "), proc.stderr
