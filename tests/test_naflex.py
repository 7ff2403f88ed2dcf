"""NaFlex SigLIP 2 (`transformers.Siglip2Model`): the preprocessing against transformers' image
processors on real photos, the position-embedding resize against torch's antialiased
`F.interpolate`, and the MLX model against random `Siglip2Model`s of unusual sizes (features,
logits, every parameter's gradient, the padding mask).

Photos: scikit-image's and scikit-learn's sample images, shipped inside their wheels.
Tolerances (float32), each about 10x the largest |difference| measured on this machine (given
beside each)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from PIL import Image

from mlx_clip.errors import ConfigError, check_int
from tests.helpers import rel_err
from mlx_clip.model.config import CLIPConfig
from mlx_clip.model.naflex import naflex_inputs, naflex_patches, naflex_size, pack, patchify, stack_patches

# Image and text features, logits (values up to 3.6): measured max |difference| 1.7e-6 with float64
# position weights, 8.3e-7 with the float32 ones the MLX graph computes now.
FEATURES_TOL = 1e-5
# Gradients: max |difference| over the largest |gradient| of the model (measured 4.7e-7 with float64
# position weights, 3.9e-7 with the graph's float32 ones), and each tensor's relative L2 error
# (measured 2.7e-6, then 1.4e-6, the pooling probe's), except the key biases, whose
# exact gradient is 0 (softmax ignores a shift shared by all keys) and whose values are float noise.
GRAD_TOL = 5e-6
GRAD_REL_TOL = 3e-5
# Resized float32 position grids vs torch (measured 2.4e-6): torch's float32 kernels compute the
# filter centres in float32 (about 1e-6 off for a 16-wide grid); ours come from float64 weights.
WEIGHTS_TOL = 2e-5


# The float64 reference of the position resize the MLX tower computes in its graph.

def antialiased_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) float64 matrix M with M @ x the resize of x along its first axis by torch's
    `F.interpolate(mode="bilinear", align_corners=False, antialias=True)`: a triangle filter
    widened by the scale when shrinking (aten/src/ATen/native/cpu/UpSampleKernel.cpp,
    `_compute_weights_aa`), each row normalized to sum 1."""
    check_int("in_size", in_size, minimum=1)
    check_int("out_size", out_size, minimum=1)
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0  # bilinear's half-width 1, widened when shrinking
    inverse = 1.0 / scale if scale >= 1.0 else 1.0
    matrix = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        first = max(int(center - support + 0.5), 0)  # int() truncates, as the C++ cast
        last = min(int(center + support + 0.5), in_size)
        taps = np.arange(first, last)
        weights = np.maximum(0.0, 1.0 - np.abs((taps - center + 0.5) * inverse))
        matrix[i, first:last] = weights / weights.sum()
    return matrix


def _grid_weights(grid: int, rows: int, cols: int) -> np.ndarray:
    """(rows * cols, grid * grid): output (r, c) = sum over (i, j) of A_rows[r, i] A_cols[c, j]
    table[i, j], both grids flattened row-major."""
    weights = np.kron(antialiased_bilinear_matrix(grid, rows), antialiased_bilinear_matrix(grid, cols))
    return weights


def position_weights(spatial_shapes: np.ndarray | Sequence[Sequence[int]], grid: int, length: int) -> np.ndarray:
    """(B, length, grid * grid) float32 W such that W @ table, with `table` the (grid * grid, D)
    position embeddings, is each image's embeddings resized to its (rows, cols) and padded to
    `length`. Padding rows repeat the image's first position, as transformers'
    `Siglip2VisionEmbeddings.resize_positional_embeddings` does (the mask hides them anyway).
    Computed in float64: transformers' float32 weights are ~1e-6 off for a 16-wide grid."""
    shapes = np.asarray(spatial_shapes).reshape(-1, 2)
    out = np.zeros((len(shapes), length, grid * grid), np.float32)
    for index, (rows, cols) in enumerate(shapes.tolist()):
        if rows < 1 or cols < 1 or rows * cols > length:
            raise ConfigError(f"spatial_shapes[{index}] must be a positive grid of at most {length} patches, "
                              f"got {rows}x{cols}")
        weights = _grid_weights(grid, rows, cols)
        out[index, :rows * cols] = weights
        out[index, rows * cols:] = weights[0]
    return out



def photos() -> dict[str, Image.Image]:
    import skimage.data
    import sklearn

    images = {name: Image.fromarray(getattr(skimage.data, name)()) for name in ("astronaut", "coffee", "chelsea",
                                                                                 "rocket")}
    folder = Path(sklearn.__file__).parent / "datasets" / "images"
    for name in ("china", "flower"):
        with Image.open(folder / f"{name}.jpg") as image:
            images[name] = image.convert("RGB")
    return images


@pytest.fixture(scope="module")
def images() -> dict[str, Image.Image]:
    return photos()


def processor(backend: str = "pil", **kwargs):
    from transformers import Siglip2ImageProcessor, Siglip2ImageProcessorPil

    return (Siglip2ImageProcessorPil if backend == "pil" else Siglip2ImageProcessor)(**kwargs)


def assert_batch_equal(ours, ref) -> None:
    names = ("pixel_values", "pixel_attention_mask", "spatial_shapes")
    for name, array in zip(names, ours):
        assert array.dtype == ref[name].dtype, name
        assert np.array_equal(array, ref[name]), name


# ------------------------------------------------------------------------------- preprocessing

@pytest.mark.parametrize("patch_size", [16, 14])
@pytest.mark.parametrize("max_num_patches", [64, 97, 256])
def test_inputs_equal_the_pil_processor_bit_for_bit(images, patch_size, max_num_patches):
    batch = list(images.values())
    ref = processor(patch_size=patch_size)(batch, max_num_patches=max_num_patches, return_tensors="np")
    assert_batch_equal(naflex_inputs(batch, patch_size, max_num_patches), ref)


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P"])
def test_other_modes_equal_the_processor_converting_to_rgb(images, mode):
    """The processor refuses non-RGB images unless asked to convert (do_convert_rgb=True)."""
    import skimage.data

    batch = [images["chelsea"].convert(mode), Image.fromarray(skimage.data.camera()).convert(mode)]
    if mode == "RGBA":  # a real alpha channel
        batch.append(Image.fromarray(skimage.data.logo()))
    ref = processor(do_convert_rgb=True)(batch, max_num_patches=61, return_tensors="np")
    assert_batch_equal(naflex_inputs(batch, 16, 61), ref)


def test_the_torchvision_processor_differs_by_at_most_one_level(images):
    """transformers 5's default `Siglip2ImageProcessor` (torchvision installed) resizes with torch's
    uint8 kernel and normalizes as (x - 127.5) / 127.5: same shapes and masks, values within 2/255."""
    batch = list(images.values())
    ref = processor("torchvision")(batch, max_num_patches=97, return_tensors="np")
    ours = naflex_inputs(batch, 16, 97)
    assert np.array_equal(ours.pixel_attention_mask, ref["pixel_attention_mask"])
    assert np.array_equal(ours.spatial_shapes, ref["spatial_shapes"])
    assert np.abs(ours.pixel_values - ref["pixel_values"]).max() <= 2 / 255 + 1e-6


def test_sizes_equal_transformers_for_any_aspect_ratio():
    from transformers.models.siglip2.image_processing_siglip2 import get_image_size_for_max_num_patches

    rng = np.random.default_rng(0)
    cases = [(1, 1, 16, 1), (1, 5000, 16, 256), (3000, 2, 14, 64), (224, 224, 16, 196), (37, 1001, 7, 23)]
    cases += [tuple(int(v) for v in (rng.integers(1, 3000), rng.integers(1, 3000), rng.choice([4, 7, 14, 16]),
                                     rng.integers(1, 1025))) for _ in range(200)]
    for height, width, patch, limit in cases:
        size = naflex_size(height, width, patch, limit)
        assert size == get_image_size_for_max_num_patches(height, width, patch, limit)
        assert size[0] % patch == 0 and size[1] % patch == 0 and (size[0] // patch) * (size[1] // patch) <= limit


def test_patches_are_row_major_and_padding_is_zero(images):
    pixels = np.arange(8 * 12 * 3).reshape(8, 12, 3)
    patches = patchify(pixels, 4)  # a 2x3 grid
    assert patches.shape == (6, 48)
    assert np.array_equal(patches[4], pixels[4:8, 4:8].reshape(-1))  # row 1, column 1
    patches, (rows, cols) = naflex_patches(images["coffee"], 16, 97)
    batch = stack_patches([patches, patches[:5]], [(rows, cols), (1, 5)], 97)
    assert batch.pixel_values.shape == (2, 97, 16 * 16 * 3)
    assert batch.pixel_attention_mask[1].tolist() == [1] * 5 + [0] * 92
    assert not batch.pixel_values[1, 5:].any()
    with pytest.raises(ConfigError, match=r"image 0 has 96 patches, more than max_num_patches \(50\)"):
        stack_patches([patches], [(rows, cols)], 50)


# ---------------------------------------------------------------------- position resize

RESIZES = [(4, 7, 3), (5, 2, 9), (16, 8, 32), (6, 6, 6), (4, 1, 23), (7, 3, 3), (3, 11, 2), (16, 13, 19)]


@pytest.mark.parametrize("grid,rows,cols", RESIZES)
def test_resize_matrices_equal_antialiased_interpolate(grid, rows, cols):
    """Up- and down-sampling, non-square targets: A_rows @ x @ A_cols^T per channel."""
    x = np.random.default_rng(grid * 100 + rows * 10 + cols).standard_normal((5, grid, grid))
    a_rows, a_cols = antialiased_bilinear_matrix(grid, rows), antialiased_bilinear_matrix(grid, cols)
    ours = np.einsum("ri,cig,wg->crw", a_rows, x, a_cols)  # (C, rows, cols)

    def reference(dtype):
        tensor = torch.from_numpy(x[None]).to(dtype)
        return F.interpolate(tensor, size=(rows, cols), mode="bilinear", align_corners=False, antialias=True)[0]

    assert np.abs(ours - reference(torch.float64).numpy()).max() <= 1e-12  # the weights themselves: 4.4e-16
    ours32 = np.einsum("ri,cig,wg->crw", a_rows.astype(np.float32), x.astype(np.float32), a_cols.astype(np.float32))
    assert np.abs(ours32 - reference(torch.float32).numpy()).max() <= WEIGHTS_TOL


def test_position_weights_equal_transformers_resize_with_padding():
    from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionEmbeddings

    grid, length = 5, 37
    table = torch.from_numpy(np.random.default_rng(1).standard_normal((grid * grid, 8)).astype(np.float32))
    shapes = np.array([[5, 7], [6, 6], [1, 37], [2, 3], [9, 4]], np.int64)
    ref = Siglip2VisionEmbeddings.resize_positional_embeddings(table.reshape(grid, grid, 8), torch.from_numpy(shapes),
                                                               max_length=length).numpy()
    ours = position_weights(shapes, grid, length) @ table.numpy()
    assert np.abs(ours - ref).max() <= WEIGHTS_TOL
    with pytest.raises(ConfigError, match=r"spatial_shapes\[1\] must be a positive grid of at most 37 patches, "
                                          r"got 7x6"):
        position_weights([[1, 1], [7, 6]], grid, length)


def test_weights_computed_in_the_graph_equal_the_float64_ones():
    """The MLX model resizes inside its graph (one compiled function for every mix of shapes);
    its float32 weights against the float64 ones above: measured 2.5e-7 (7.7e-7 for a 16-wide grid,
    base's, at 256 patches), bound 3e-6."""
    from mlx_clip.mlx_backend.siglip2 import resize_weights

    grid, length = 5, 37
    shapes = np.array([[5, 7], [6, 6], [1, 37], [2, 3], [9, 4], [1, 1]], np.int64)
    ours = np.array(resize_weights(mx.array(shapes[:, 0]), mx.array(shapes[:, 1]), grid, length))
    assert np.abs(ours - position_weights(shapes, grid, length)).max() <= 3e-6
    assert np.isfinite(ours).all()


def test_pack_round_trips_and_a_square_batch_is_refused():
    from mlx_clip.model.naflex import check_packed, unpack

    rng = np.random.default_rng(0)
    batch = stack_patches([rng.standard_normal((n, 12)).astype(np.float32) for n in (6, 1, 9)],
                          [(2, 3), (1, 1), (3, 3)], 10)
    again = unpack(pack(batch))
    for ours, theirs in zip(again, batch):
        assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)
    check_packed(pack(batch), 12)
    with pytest.raises(ConfigError, match=r"takes images as patches .* got an array of shape \(3, 32, 32, 3\)"):
        check_packed(np.zeros((3, 32, 32, 3), np.float32), 12)


# ------------------------------------------------------------------------------------ model

# Unusual sizes; num_patches square (the position grid); odd max_num_patches.
CONFIGS = {
    "p4-grid4-max23": dict(
        max_num_patches=23,
        text=dict(vocab_size=101, hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=5,
                  max_position_embeddings=11, projection_size=48),
        vision=dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3, patch_size=4,
                    num_patches=16)),
    "p7-grid5-max37-gelu": dict(
        max_num_patches=37,
        text=dict(vocab_size=67, hidden_size=24, intermediate_size=40, num_hidden_layers=1, num_attention_heads=3,
                  max_position_embeddings=7, projection_size=36, hidden_act="gelu", layer_norm_eps=1e-5),
        vision=dict(hidden_size=36, intermediate_size=52, num_hidden_layers=2, num_attention_heads=4, patch_size=7,
                    num_patches=25, hidden_act="gelu", layer_norm_eps=1e-5)),
}


def hf_siglip2(seed: int, spec: dict):
    import transformers

    torch.manual_seed(seed)
    config = transformers.Siglip2Config(text_config={**spec["text"], "bos_token_id": None, "eos_token_id": 1},
                                        vision_config=spec["vision"])
    model = transformers.Siglip2Model(config).eval().float()
    with torch.no_grad():  # transformers starts biases, norms, scale and bias at constants: move them all
        for name, param in model.named_parameters():
            if name.endswith("bias") or name in ("logit_scale", "logit_bias"):
                param.normal_(0.0, 0.1)
            elif "norm" in name:
                param.normal_(1.0, 0.1)
    return model


def mlx_siglip2(hf_model):
    from mlx_clip.mlx_backend.siglip2 import from_torch_state_dict

    return from_torch_state_dict(CLIPConfig.from_dict(hf_model.config.to_dict()), hf_model.state_dict())


def model_batch(images: dict[str, Image.Image], spec: dict):
    """One batch of several aspect ratios (square, wide, tall, a thin strip, a tiny image), padded."""
    chosen = [images["astronaut"], images["rocket"], images["coffee"].crop((0, 0, 90, 400)),
              images["chelsea"].crop((0, 100, 451, 112)), images["flower"].resize((9, 13))]
    batch = naflex_inputs(chosen, spec["vision"]["patch_size"], spec["max_num_patches"])
    assert len({tuple(s) for s in batch.spatial_shapes.tolist()}) == len(chosen)
    assert batch.pixel_attention_mask.sum(1).min() < spec["max_num_patches"]
    return batch


def torch_inputs(batch) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(array) for name, array in batch._asdict().items()}


def random_ids(rng, batch: int, spec: dict) -> np.ndarray:
    return rng.integers(0, spec["text"]["vocab_size"], size=(batch, spec["text"]["max_position_embeddings"]))


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_features_and_logits_match_transformers(images, name):
    spec = CONFIGS[name]
    hf = hf_siglip2(1, spec)
    model = mlx_siglip2(hf)
    batch = model_batch(images, spec)
    ids = random_ids(np.random.default_rng(2), len(batch.spatial_shapes), spec)
    with torch.no_grad():
        image = hf.get_image_features(**torch_inputs(batch)).pooler_output.numpy()
        text = hf.get_text_features(input_ids=torch.from_numpy(ids)).pooler_output.numpy()
        logits = hf(input_ids=torch.from_numpy(ids), **torch_inputs(batch)).logits_per_image.numpy()
    assert max_abs(model.get_image_features(pack(batch)), image) <= FEATURES_TOL
    assert max_abs(model.get_text_features(ids), text) <= FEATURES_TOL
    assert max_abs(model(ids, pack(batch))["logits_per_image"], logits) <= FEATURES_TOL


def test_parameter_paths_and_shapes_equal_transformers():
    hf = hf_siglip2(0, CONFIGS["p7-grid5-max37-gelu"])
    model = mlx_siglip2(hf)
    ours = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    assert ours == {k: tuple(v.shape) for k, v in hf.state_dict().items()}


def test_a_bfloat16_state_dict_loads_as_bfloat16():
    from mlx_clip.mlx_backend.siglip2 import from_torch_state_dict

    hf = hf_siglip2(0, CONFIGS["p4-grid4-max23"])
    state = {k: v.bfloat16() for k, v in hf.state_dict().items()}
    model = from_torch_state_dict(CLIPConfig.from_dict(hf.config.to_dict()), state)
    table = model.vision_model.embeddings.position_embedding.weight
    assert table.dtype == mx.bfloat16
    reference = state["vision_model.embeddings.position_embedding.weight"].float().numpy()
    assert np.array_equal(np.array(table.astype(mx.float32)), reference)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradients_match_torch(images, name):
    """d/dθ of Σ image_features·u + Σ text_features·v + Σ logits·w, for every parameter θ."""
    spec = CONFIGS[name]
    hf = hf_siglip2(3, spec)
    model = mlx_siglip2(hf)
    batch = model_batch(images, spec)
    rng = np.random.default_rng(4)
    ids = random_ids(rng, len(batch.spatial_shapes), spec)
    u, v = (rng.standard_normal((len(ids), hf.config.vision_config.hidden_size)).astype(np.float32) for _ in "uv")
    w = rng.standard_normal((len(ids), len(ids))).astype(np.float32)

    def loss_fn(m):
        out = m(ids, pack(batch))
        return ((m.get_image_features(pack(batch)) * mx.array(u)).sum() + (m.get_text_features(ids) * mx.array(v)).sum()
                + (out["logits_per_image"] * mx.array(w)).sum())

    _, grads = nn.value_and_grad(model, loss_fn)(model)
    grads = {k: np.array(g) for k, g in tree_flatten(grads)}
    inputs = torch_inputs(batch)
    image = hf.get_image_features(**inputs).pooler_output
    text = hf.get_text_features(input_ids=torch.from_numpy(ids)).pooler_output
    logits = hf(input_ids=torch.from_numpy(ids), **inputs).logits_per_image
    ((image * torch.from_numpy(u)).sum() + (text * torch.from_numpy(v)).sum()
     + (logits * torch.from_numpy(w)).sum()).backward()
    reference = {k: p.grad.numpy() for k, p in hf.named_parameters()}
    assert set(grads) == set(reference)
    scale = max(np.abs(g).max() for g in reference.values())
    for key, grad in grads.items():
        ref = reference[key]
        assert max_abs(grad, ref) <= GRAD_TOL * scale, key
        if key.endswith("k_proj.bias"):
            continue
        if key.endswith("in_proj_bias"):  # rows q, k, v: drop k's
            third = len(ref) // 3
            grad, ref = np.delete(grad, np.s_[third:2 * third]), np.delete(ref, np.s_[third:2 * third])
        assert rel_err(grad, ref) <= GRAD_REL_TOL, key


def test_padded_patches_do_not_change_the_features(images):
    spec = CONFIGS["p4-grid4-max23"]
    model = mlx_siglip2(hf_siglip2(5, spec))
    batch = model_batch(images, spec)
    padded = batch.pixel_attention_mask == 0
    noisy = batch.pixel_values.copy()
    noisy[padded] = np.random.default_rng(6).normal(0.0, 3.0, size=noisy[padded].shape)
    clean = np.array(model.get_image_features(pack(batch)))
    assert np.array_equal(np.array(model.get_image_features(pack(batch._replace(pixel_values=noisy)))), clean)
    # ... and the mask is what hides them: without it the same noise moves every padded image.
    unmasked = np.array(model.get_image_features(pack(batch._replace(pixel_values=noisy, pixel_attention_mask=np.ones_like(batch.pixel_attention_mask)))))
    assert np.abs(unmasked - clean)[padded.any(axis=1)].max(axis=1).min() > 1e-3


# ----------------------------------------------------------------------------------- config

def test_config_round_trips_through_transformers():
    import transformers

    hf_config = hf_siglip2(0, CONFIGS["p7-grid5-max37-gelu"]).config.to_dict()
    config = CLIPConfig.from_dict(hf_config)
    assert (config.vision_config.grid, config.vision_config.patch_dim, config.projection_dim) == (5, 147, 36)
    again = transformers.Siglip2Config(**config.to_dict()).to_dict()
    for section in ("text_config", "vision_config"):
        assert {k: v for k, v in again[section].items() if k in hf_config[section]} == hf_config[section]


@pytest.mark.parametrize("change,message", [
    ({"vision_config": {"patch_size": [4, 5]}}, "patch_size must be square"),
    ({"vision_config": {"num_patches": 20}}, "num_patches must be a square number"),
    ({"text_config": {"projection_size": 10}}, r"projection_size \(10\) must equal vision_config.hidden_size"),
])
def test_bad_configs_are_refused_in_one_line(change, message):
    data = {"model_type": "siglip2", "text_config": {}, "vision_config": {}, **change}
    with pytest.raises(ConfigError, match=message):
        CLIPConfig.from_dict(data)
