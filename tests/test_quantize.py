"""`--quantize 8|4` and `convert --quantize`: MLX's quantized Linears (`mlx_backend/quantize.py`).

References: MLX's own `mx.dequantize` and `nn.QuantizedLinear` (the layer's CPU and GPU paths), and
the float32 model (how far quantization moves the embeddings). Tolerances, each measured here:
- CPU path vs `mx.dequantize` + `mx.addmm`: exact (the same ops);
- CPU path vs `nn.QuantizedLinear` (MLX's quantized matmul kernel): 1e-5 max abs on outputs of
  magnitude ~2 (measured 3.6e-7 at 8 bits, 4.2e-7 at 4: float32 sums in another order);
- a folder written by `convert --quantize 8` vs quantizing in memory: exact (the same arrays);
- cosine to float32 on the tiny model: see COSINE_BOUNDS.
"""

import mlx_clip  # noqa: F401  (BLAS loader first)

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
import pytest
from click.testing import CliRunner
from PIL import Image

from mlx_clip.api import load, resolve
from mlx_clip.cli import main
from mlx_clip.conversion import verify_batch
from mlx_clip.engine.protocol import load_backend
from mlx_clip.errors import ConfigError
from mlx_clip.mlx_backend import quantize as quantize_module
from mlx_clip.mlx_backend.quantize import QuantizedLinear
from tests.helpers import assert_refused

NATIVE_TOL = 1e-5
# Lowest per-row cosine of the tiny model's embeddings to its float32 ones, on 16 seeded synthetic
# inputs; each bound is 1 - ~10x the measured distance from 1 (measured: 8-bit image 0.999981, text
# 0.999864; 4-bit image 0.99313, text 0.96743).
COSINE_BOUNDS = {8: {"image": 0.9998, "text": 0.9986}, 4: {"image": 0.93, "text": 0.67}}
TEXTS = ["a red circle", "a blue square on grey", "two green triangles"]


@pytest.fixture(scope="module")
def tiny():
    return resolve("tiny")


@pytest.fixture(scope="module")
def quantized_folder(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized") / "tiny-q8"
    result = CliRunner().invoke(main, ["convert", str(tiny), str(out), "--to", "mlx", "--quantize", "8"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quantize-images")
    rng = np.random.default_rng(3)
    for i in range(3):
        pixels = rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return sorted(folder.glob("*.png"))


# --- the layer -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
def test_cpu_path_is_dequantize_then_matmul_and_agrees_with_mlx_quantized_kernel(bits):
    linear = nn.Linear(128, 96)
    x = mx.random.normal((5, 7, 128), key=mx.random.key(1))
    ours = QuantizedLinear.from_linear(linear, group_size=64, bits=bits)
    native = nn.QuantizedLinear.from_linear(linear, group_size=64, bits=bits)
    assert all(mx.array_equal(ours[k], native[k]).item() for k in ("weight", "scales", "biases", "bias"))

    reference = mx.addmm(linear.bias, x, mx.dequantize(ours.weight, ours.scales, ours.biases, 64, bits).T)
    assert mx.array_equal(ours(x), reference).item()
    assert mx.abs(ours(x) - native(x)).max().item() < NATIVE_TOL
    assert mx.abs(reference - linear(x)).max().item() > 0  # it is quantized, not the float layer


@pytest.mark.parametrize("bits", [8, 4])
def test_gpu_path_is_mlx_quantized_matmul(bits, monkeypatch):
    """Off the CPU the layer uses MLX's kernel: forced here on the CPU, it equals nn.QuantizedLinear."""
    linear = nn.Linear(64, 32, bias=False)
    x = mx.random.normal((3, 64), key=mx.random.key(2))
    monkeypatch.setattr(quantize_module, "use_cpu_math", lambda: False)
    ours = QuantizedLinear.from_linear(linear, group_size=64, bits=bits)
    assert mx.array_equal(ours(x), nn.QuantizedLinear.from_linear(linear, group_size=64, bits=bits)(x)).item()


@pytest.mark.parametrize("name", ["tiny", "siglip-tiny"])
def test_which_layers_are_quantized(name):
    engine = load_backend("mlx", resolve(name), quantize=4)
    model = engine.model
    quantized = {path for path, module in model.named_modules() if isinstance(module, QuantizedLinear)}
    floats = {path for path, module in model.named_modules() if isinstance(module, nn.Linear)}
    assert not floats, floats  # every Linear of both families has a width that splits into groups of 64
    suffixes = {path.rsplit(".", 1)[-1] for path in quantized}
    assert {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"} <= suffixes
    if name == "tiny":
        assert {"visual_projection", "text_projection"} <= quantized
    else:
        assert {"text_model.head", "vision_model.head.attention.out_proj"} <= quantized
    params = dict(tree_flatten(model.parameters()))
    for path in quantized:
        assert params[f"{path}.weight"].dtype == mx.uint32
    kept_float = [k for k in params if "embedding" in k or "norm" in k or "logit" in k or "in_proj" in k]
    assert kept_float and all(params[k].dtype == mx.float32 for k in kept_float)
    assert engine.config.quantization == {"group_size": 64, "bits": 4}


@pytest.mark.parametrize("name", ["tiny", "vit-b32"])
def test_weight_memory_is_what_the_bits_imply(name):
    """Counted from the float model's own Linears: each quantized weight takes `bits`, plus a float32
    scale and bias per 64 weights; everything else stays float32. (ViT-B/32: 577.1 MiB float32,
    238.9 at 8 bits, 180.1 at 4; its 101 MB float32 token embedding is most of what remains.)"""
    from mlx_clip.benchmarks.worker import weight_bytes

    folder = resolve(name)
    float_engine = load_backend("mlx", folder)
    linears = [m.weight.shape for _, m in float_engine.model.named_modules() if isinstance(m, nn.Linear)]
    total = weight_bytes(float_engine)
    for bits in (8, 4):
        quantized_bytes = sum(o * i * bits // 8 + 2 * 4 * o * (i // 64) for o, i in linears)
        expected = total - sum(4 * o * i for o, i in linears) + quantized_bytes
        assert weight_bytes(load_backend("mlx", folder, quantize=bits)) == expected


# --- accuracy ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_embeddings_stay_close_to_float32(tiny, bits):
    reference = load_backend("mlx", tiny)
    quantized = load_backend("mlx", tiny, quantize=bits)
    pixels, ids = verify_batch(reference.config, batch=16)
    for kind, a, b in (("image", reference.encode_images(pixels), quantized.encode_images(pixels)),
                       ("text", reference.encode_texts(ids), quantized.encode_texts(ids))):
        cosine = np.sum(a * b, axis=-1)  # both L2-normalised
        assert cosine.min() >= COSINE_BOUNDS[bits][kind], (kind, cosine.min())
        assert cosine.min() < 1 - 1e-7  # quantization did change the model


# --- the quantized folder ------------------------------------------------------------------------
def test_quantized_folder_holds_mlx_lm_triplets_and_loads_back_equal(tiny, quantized_folder):
    config = json.loads((quantized_folder / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 8}
    tensors = mx.load(str(quantized_folder / "model.safetensors"))
    layer = "vision_model.encoder.layers.0.self_attn.q_proj"
    assert tensors[f"{layer}.weight"].dtype == mx.uint32 and tensors[f"{layer}.weight"].shape == (64, 16)
    assert tensors[f"{layer}.scales"].shape == tensors[f"{layer}.biases"].shape == (64, 1)
    assert tensors["vision_model.embeddings.patch_embedding.weight"].dtype == mx.float32

    from_folder = load_backend("mlx", quantized_folder)  # no quantize: the folder says it
    in_memory = load_backend("mlx", tiny, quantize=8)
    pixels, ids = verify_batch(in_memory.config, batch=4)
    assert np.array_equal(from_folder.encode_images(pixels), in_memory.encode_images(pixels))
    assert np.array_equal(from_folder.encode_texts(ids), in_memory.encode_texts(ids))
    assert load(quantized_folder).config.quantization == {"group_size": 64, "bits": 8}


def test_quantized_folder_loads_at_another_image_size(quantized_folder):
    engine = load_backend("mlx", quantized_folder, image_size=48)
    assert engine.config.vision_config.image_size == 48
    assert engine.encode_images(np.zeros((1, 48, 48, 3), np.float32)).shape == (1, 64)


def test_a_quantized_folder_keeps_its_width(quantized_folder):
    load_backend("mlx", quantized_folder, quantize=8)  # the same width: as written
    with pytest.raises(ConfigError, match="already quantized"):
        load_backend("mlx", quantized_folder, quantize=4)


# --- refusals ------------------------------------------------------------------------------------
def test_torch_engine_refuses_the_flag(tiny, tmp_path):
    result = CliRunner().invoke(main, ["embed", "--model", str(tiny), "--text", "a cat", "--out",
                                       str(tmp_path / "e.npz"), "--backend", "torch", "--quantize", "8"])
    assert_refused(result, "--quantize 8", "MLX engine only", "--backend mlx")


def test_torch_engine_refuses_a_quantized_folder(quantized_folder, tmp_path):
    result = CliRunner().invoke(main, ["embed", "--model", str(quantized_folder), "--text", "a cat", "--out",
                                       str(tmp_path / "e.npz"), "--backend", "torch"])
    assert_refused(result, str(quantized_folder), "8-bit, group size 64", "--backend torch", "--backend mlx")


def test_conversion_to_float_formats_refused(tiny, quantized_folder, tmp_path):
    result = CliRunner().invoke(main, ["convert", str(quantized_folder), str(tmp_path / "hf"), "--to", "hf"])
    assert_refused(result, str(quantized_folder), "--to hf", "float folder")
    result = CliRunner().invoke(main, ["convert", str(tiny), str(tmp_path / "hf"), "--to", "hf", "--quantize", "4"])
    assert_refused(result, "--quantize 4", "--to hf", "--to mlx")
    assert not (tmp_path / "hf").exists()


def test_training_a_quantized_folder_refused(quantized_folder, tmp_path):
    data = tmp_path / "data"
    for colour, name in (((200, 10, 10), "red"), ((10, 10, 200), "blue")):
        for i in range(2):
            (data / name).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), colour).save(data / name / f"{i}.png")
    result = CliRunner().invoke(main, ["finetune", "--model", str(quantized_folder), "--data", str(data),
                                       "--backend", "mlx", "--out", str(tmp_path / "run"), "--steps", "2",
                                       "--batch-size", "2", "--no-evaluate"])
    assert_refused(result, str(quantized_folder), "training stays float32", "convert --quantize")


def test_quantize_takes_8_or_4(tiny, tmp_path):
    result = CliRunner().invoke(main, ["embed", "--model", str(tiny), "--text", "a cat", "--out",
                                       str(tmp_path / "e.npz"), "--quantize", "3"])
    assert result.exit_code == 2 and "'3' is not one of '8', '4'" in result.output, result.output
    with pytest.raises(ConfigError, match="quantize must be one of 8, 4"):
        load(tiny, quantize=16)


# --- the commands end to end ---------------------------------------------------------------------
def test_embed_with_quantize(tiny, images, tmp_path):
    out = tmp_path / "e.npz"
    result = CliRunner().invoke(main, ["embed", "--model", str(tiny), *sum((["--image", str(p)] for p in images), []),
                                       *sum((["--text", t] for t in TEXTS), []), "--out", str(out), "--quantize", "4"])
    assert result.exit_code == 0, result.output
    written = np.load(out)
    clip = load(tiny, quantize=4)
    assert np.array_equal(written["image_embeds"], clip.encode_images(images))
    assert np.array_equal(written["text_embeds"], clip.encode_texts(TEXTS))
    assert not np.allclose(written["text_embeds"], load(tiny).encode_texts(TEXTS), atol=1e-6)


def test_index_with_quantize_and_a_rebuild_without(tiny, images, tmp_path):
    out = tmp_path / "index"
    result = CliRunner().invoke(main, ["index", str(images[0].parent), "--model", str(tiny), "--out", str(out),
                                       "--quantize", "8"])
    assert result.exit_code == 0 and "3 embedded" in result.output, result.output
    assert json.loads((out / "index.json").read_text())["quantize"] == 8
    from mlx_clip.index import ImageIndex

    index = ImageIndex.load(out)
    expected = load(tiny, quantize=8).encode_images([images[0].parent / p for p in index.paths])
    assert np.array_equal(index.embeddings, expected)
    # Float rows are not the quantized rows: a rebuild without --quantize embeds every image again.
    result = CliRunner().invoke(main, ["index", str(images[0].parent), "--model", str(tiny), "--out", str(out)])
    assert result.exit_code == 0 and "3 embedded, 0 unchanged" in result.output, result.output


def test_quantize_benchmark_reports_each_width_against_float32(tiny, tmp_path):
    """`python -m mlx_clip.benchmarks.quantize`: the cosines are recomputed here from `embed`'s own
    output, and the top-1 change is the difference of the two zero-shot figures it reports."""
    from mlx_clip.benchmarks.quantize import main as bench_main, markdown

    data = tmp_path / "val"
    rng = np.random.default_rng(0)
    for name in ("red", "blue", "green"):
        (data / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(data / name / f"{i}.png")
    out = tmp_path / "q.json"
    bench_main([str(tiny), "--data", str(data), "--repeats", "1", "--batch-size", "4", "--json", str(out)])
    results = json.loads(out.read_text())
    images = sorted(data.glob("*/*.png"))
    float_embeds = load(tiny).encode_images(images)
    for bits in ("8", "4"):
        row = results[bits]
        assert row["weight_bytes"] < results["float32"]["weight_bytes"]
        assert row["images"] == 9 and row["images_per_s"] > 0 and row["texts_per_s"] > 0
        cosine = np.sum(load(tiny, quantize=int(bits)).encode_images(images) * float_embeds, axis=-1)
        assert row["image_cosine"]["min"] == pytest.approx(cosine.min(), abs=1e-6)
        assert row["image_cosine"]["mean"] == pytest.approx(cosine.mean(), abs=1e-6)
        assert row["top1_change"] == pytest.approx(row["zero_shot_top1"] - results["float32"]["zero_shot_top1"])
        assert f"| {bits}-bit |" in markdown(results)
