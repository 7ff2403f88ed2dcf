"""`mlxclip convert`, `--quantize` and `mlxclip export` for NaFlex SigLIP 2 (`transformers.Siglip2Model`),
held to transformers (its `save_pretrained` / `from_pretrained`, `Siglip2Config`), the `safetensors`
library's reader, torch's bfloat16 rounding and onnxruntime.

Models: random `Siglip2Model`s of unusual sizes (`tests/test_naflex.py`'s `hf_siglip2`: biases and
norms moved off their constants); photos: scikit-image's and scikit-learn's samples, preprocessed
by `NaflexProcessor` at patch budgets other than the position grid's.
Tolerances: conversions are bit-exact (same bytes); quantized embeddings see QUANTIZED_MIN_COSINE;
onnxruntime against the torch engine 1e-5 absolute (as tests/test_export.py: measured 1.6e-7).
"""

import mlx_clip  # noqa: F401  (BLAS loader first)

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mlx_clip.api import resolve
from mlx_clip.cli import main
from mlx_clip.conversion import convert, verify_batch
from mlx_clip.convert.writer import write_naflex_preprocessor_config
from mlx_clip.engine.protocol import load_backend
from mlx_clip.errors import ConvertError
from mlx_clip.mlx_backend.quantize import QuantizedLinear
from mlx_clip.model.naflex import NaflexProcessor
from tests.helpers import assert_refused, assert_same_bytes, tensors_of
from tests.test_naflex import CONFIGS, hf_siglip2, photos

# Patches 4 px on a 4x4 position grid, widths 48 / 40, 3 and 5 heads, 101 tokens, an 11-token context.
SPEC = CONFIGS["p4-grid4-max23"]
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MAX_NUM_PATCHES = 23  # the source's preprocessor budget: not the grid's 16, and odd
PATCH_EMBEDDING = "vision_model.embeddings.patch_embedding"

# For quantization, widths that split into groups of 64 where it matters, and some that do not:
# fc2 reads 96 (vision) and 160 (text) features, so it stays float; the patch embedding reads 192
# (8x8x3) and stays float by name (`quantize.FLOAT_LINEARS`).
QUANT_SPEC = dict(
    text=dict(vocab_size=101, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2,
              max_position_embeddings=11, projection_size=64),
    vision=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, patch_size=8,
                num_patches=25))
# Lowest per-row cosine of quantized to float32 embeddings (13 photos, 13 seeded texts); each bound
# is 1 - ~10x the measured distance from 1 (measured: 8-bit image 0.999872, text 0.999924; 4-bit
# image 0.97885, text 0.98297).
QUANTIZED_MIN_COSINE = {8: {"image": 0.9987, "text": 0.9992}, 4: {"image": 0.79, "text": 0.83}}
ONNX_TOL = 1e-5


def save_siglip2(model, folder, *, side_files: bool = True):
    """What `save_pretrained` writes, plus (`side_files`) a SigLIP tokenizer (the built-in
    siglip2-naflex-tiny's: only loaded, never run on these models' small vocabularies) and a
    NaFlex preprocessor config, as a hub folder has them."""
    model.save_pretrained(folder, safe_serialization=True)
    if side_files:
        for name in SIDE_FILES:
            shutil.copy(resolve("siglip2-naflex-tiny") / name, folder / name)
        write_naflex_preprocessor_config(folder, model.config.vision_config.patch_size, MAX_NUM_PATCHES)
    return folder


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_ran(result):
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    model = hf_siglip2(1, SPEC)
    return model, save_siglip2(model, tmp_path_factory.mktemp("naflex") / "src")


@pytest.fixture(scope="module")
def quant_source(tmp_path_factory):
    return save_siglip2(hf_siglip2(2, QUANT_SPEC), tmp_path_factory.mktemp("naflex-q") / "src", side_files=False)


@pytest.fixture(scope="module")
def images():
    return list(photos().values())


@pytest.fixture(scope="module")
def packed_photos(images):
    """13 photos of several aspect ratios (a tall crop, a wide strip), packed for 8 px patches."""
    import skimage.data
    from PIL import Image

    images = list(images)
    images += [Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
               for name in ("camera", "coins", "horse", "page", "retina")]
    images += [images[0].crop((0, 0, 90, 400)), images[2].crop((0, 100, 451, 140))]
    processor = NaflexProcessor(QUANT_SPEC["vision"]["patch_size"], MAX_NUM_PATCHES)
    packed = np.stack([processor(image) for image in images])
    assert len({tuple(row) for row in packed[:, 0, -2:].tolist()}) >= 4  # several grids
    return packed


# ---------------------------------------------------------------- conversion

def test_hf_mlx_hf_round_trip_is_bit_identical_and_loads_in_transformers(source, tmp_path):
    import transformers
    from safetensors import safe_open

    model, src = source
    mlx, back = tmp_path / "mlx", tmp_path / "hf"
    assert_ran(run("convert", src, mlx, "--to", "mlx"))  # verified: torch on src, MLX on the result
    assert_ran(run("convert", mlx, back, "--to", "hf"))  # verified: torch on both
    src_tensors = tensors_of(src / "model.safetensors")
    with safe_open(str(mlx / "model.safetensors"), "np") as f:
        assert f.metadata()["format"] == "mlx"
        # A Linear, not a convolution: the same (hidden, p*p*3) array in MLX and torch files.
        assert np.array_equal(f.get_tensor(f"{PATCH_EMBEDDING}.weight"),
                              src_tensors[f"{PATCH_EMBEDDING}.weight"].numpy())
    assert_same_bytes(tensors_of(back / "model.safetensors"), src_tensors)
    assert json.loads((back / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert (transformers.Siglip2Config.from_pretrained(back).to_dict()
            == transformers.Siglip2Config.from_pretrained(src).to_dict())
    for name in (*SIDE_FILES, "preprocessor_config.json"):
        assert (mlx / name).read_bytes() == (src / name).read_bytes() == (back / name).read_bytes(), name
    reloaded, info = transformers.Siglip2Model.from_pretrained(back, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    reference = model.state_dict()
    assert set(reloaded.state_dict()) == set(reference)
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, reference[name]), name


def test_bfloat16_stays_bfloat16_through_every_format(source, tmp_path):
    _, src = source
    bf16 = convert(src, tmp_path / "bf16", to="hf", dtype="bfloat16")  # verified: cosine >= 0.99
    stored = tensors_of(bf16 / "model.safetensors")
    assert_same_bytes(stored, {k: v.to(torch.bfloat16) for k, v in tensors_of(src / "model.safetensors").items()})
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    mlx = convert(bf16, tmp_path / "mlx", to="mlx")  # no dtype: every tensor keeps its own
    back = convert(mlx, tmp_path / "back", to="hf")
    assert_same_bytes(tensors_of(back / "model.safetensors"), stored)
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"


def test_verification_sees_a_transposed_position_grid(source, tmp_path, monkeypatch):
    """The check embeds packed images of random grids: a position table written column-major (a
    slip in the grid's layout, every tensor the right shape) fails it and leaves nothing behind."""
    import mlx_clip.convert.converter as converter

    _, src = source
    real_write = converter.write_stored
    name = "vision_model.embeddings.position_embedding.weight"

    def transposing_write(folder, to, config, tensors, *args, **kwargs):
        table = tensors[name].array
        grid = int(round(len(table) ** 0.5))
        swapped = table.reshape(grid, grid, -1).transpose(1, 0, 2).reshape(table.shape).copy()
        return real_write(folder, to, config, {**tensors, name: tensors[name].with_array(swapped)}, *args, **kwargs)

    monkeypatch.setattr(converter, "write_stored", transposing_write)
    with pytest.raises(ConvertError, match="verification failed: image embeddings differ"):
        convert(src, tmp_path / "mlx", to="mlx")
    assert list(tmp_path.iterdir()) == []  # neither the destination nor a staging folder


def test_open_clip_is_refused_in_one_line_leaving_nothing(source, tmp_path):
    _, src = source
    result = run("convert", src, tmp_path / "oc", "--to", "open_clip")
    assert_refused(result, "--to open_clip", "open_clip has no NaFlex SigLIP 2 model", "hf", "mlx")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- quantization

def test_which_linears_are_quantized(quant_source):
    float_model = load_backend("mlx", quant_source).model
    linears = {path: m.weight.shape[-1] for path, m in float_model.named_modules() if isinstance(m, nn.Linear)}
    assert linears[PATCH_EMBEDDING] % 64 == 0  # kept float by name, not by width
    model = load_backend("mlx", quant_source, quantize=4).model
    quantized = {path for path, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert quantized == {path for path, width in linears.items() if width % 64 == 0 and path != PATCH_EMBEDDING}
    floats = {path for path, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert floats == {PATCH_EMBEDDING, *(p for p in linears if p.endswith("fc2"))}
    assert {"text_model.head", "vision_model.head.attention.out_proj", "vision_model.head.mlp.fc1"} <= quantized


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_embeddings_of_photos_stay_close_to_float32(quant_source, packed_photos, bits):
    reference = load_backend("mlx", quant_source)
    quantized = load_backend("mlx", quant_source, quantize=bits)
    _, ids = verify_batch(reference.config, batch=len(packed_photos), seed=1)
    for kind, a, b in (("image", reference.encode_images(packed_photos), quantized.encode_images(packed_photos)),
                       ("text", reference.encode_texts(ids), quantized.encode_texts(ids))):
        cosine = np.sum(np.asarray(a, np.float64) * b, axis=-1)  # both L2-normalised
        assert cosine.min() >= QUANTIZED_MIN_COSINE[bits][kind], (kind, cosine.min())
        assert cosine.min() < 1 - 1e-7  # quantization did change the model


def test_quantized_folder_loads_back_equal(quant_source, packed_photos, tmp_path):
    out = tmp_path / "q4"
    assert_ran(run("convert", quant_source, out, "--to", "mlx", "--quantize", "4"))  # verified: cosine >= 0.8
    assert json.loads((out / "config.json").read_text())["quantization"] == {"group_size": 64, "bits": 4}
    stored = mx.load(str(out / "model.safetensors"))
    assert stored["vision_model.encoder.layers.0.mlp.fc1.weight"].dtype == mx.uint32
    assert stored[f"{PATCH_EMBEDDING}.weight"].dtype == mx.float32 and f"{PATCH_EMBEDDING}.scales" not in stored
    from_folder = load_backend("mlx", out)  # no quantize: the folder says it
    in_memory = load_backend("mlx", quant_source, quantize=4)
    _, ids = verify_batch(in_memory.config, batch=4, seed=2)
    assert np.array_equal(from_folder.encode_images(packed_photos), in_memory.encode_images(packed_photos))
    assert np.array_equal(from_folder.encode_texts(ids), in_memory.encode_texts(ids))


# ---------------------------------------------------------------- ONNX export

def test_export_runs_in_onnxruntime_as_the_torch_engine(source, images, tmp_path):
    """Traced on 2 images of 16 patches; run on 6 photos packed to 23 and 3 texts."""
    import onnxruntime

    from mlx_clip.export import IMAGE_FILE, SPEC_FILE, TEXT_FILE

    _, src = source
    out = tmp_path / "onnx"
    result = assert_ran(run("export", src, "--to", "onnx", out))
    assert result.stdout.strip() == f"wrote {out}"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [IMAGE_FILE, TEXT_FILE, SPEC_FILE, "preprocessor_config.json", *SIDE_FILES])
    spec = json.loads((out / SPEC_FILE).read_text())
    image_input = spec["image_encoder"]["input"]
    assert image_input["shape"] == ["batch", "patches", 4 * 4 * 3 + 3]
    assert (image_input["patch_size"], image_input["max_num_patches"]) == (4, MAX_NUM_PATCHES)
    assert spec["text_encoder"]["input"]["pooling"] == "last position"

    engine = load_backend("torch", src)
    processor = NaflexProcessor(SPEC["vision"]["patch_size"], MAX_NUM_PATCHES)
    pixels = np.stack([processor(image) for image in images])
    assert pixels.shape[1] != SPEC["vision"]["num_patches"]
    _, ids = verify_batch(engine.config, batch=3, seed=3)
    for file, name, inputs, reference in ((IMAGE_FILE, "pixel_values", pixels, engine.encode_images),
                                          (TEXT_FILE, "input_ids", ids, engine.encode_texts)):
        session = onnxruntime.InferenceSession(str(out / file), providers=["CPUExecutionProvider"])
        got = session.run(None, {name: inputs})[0]
        want = reference(inputs)
        assert got.shape == want.shape
        assert np.abs(got.astype(np.float64) - want).max() <= ONNX_TOL, file
