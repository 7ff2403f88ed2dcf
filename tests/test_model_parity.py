"""The MLX model against `transformers.CLIPModel` on the same random weights.

Tolerance: relative L2 error <= 1e-5 in float32 (accumulation order differs between MLX's and
torch's kernels; a single float32 rounding is ~6e-8, a few layers of matmuls reach ~1e-6). Measured
on this machine: 1.9e-7 to 8.0e-7 for the small configs, 2.1e-6 for ViT-B/32's 12 layers of 768;
the interpolated positions and the saved-and-reloaded model (a few layers, 32 wide) 1.6e-7, held to
2e-6 (`SMALL`), about 10x."""

import numpy as np
import pytest
import torch

import mlx.core as mx
from mlx_clip.convert.layout import torch_to_mlx
from mlx_clip.model.config import CLIPConfig
from mlx_clip.mlx_backend.model import CLIPModel, init_weights
from tests.helpers import hf_clip, random_pixels, random_tokens, rel_err

TOL = 1e-5
SMALL = 2e-6

CONFIGS = {
    "quick_gelu-32px-p8": dict(
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  hidden_act="quick_gelu"),
        vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                    image_size=32, patch_size=8, hidden_act="quick_gelu"),
        projection_dim=24),
    "gelu-48px-p16-legacy-eos": dict(
        text=dict(hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                  hidden_act="gelu", eos_token_id=2),
        vision=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
                    image_size=48, patch_size=16, hidden_act="gelu"),
        projection_dim=32),
    "gelu-30px-p6-eps1e-6": dict(
        text=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=1, num_attention_heads=3,
                  hidden_act="gelu", layer_norm_eps=1e-6, max_position_embeddings=77),
        vision=dict(hidden_size=40, intermediate_size=72, num_hidden_layers=4, num_attention_heads=5,
                    image_size=30, patch_size=6, hidden_act="gelu", layer_norm_eps=1e-6),
        projection_dim=20, logit_scale_init_value=3.1),
    "vit-b32-defaults": dict(),
}


def mlx_from_hf(hf_model) -> CLIPModel:
    config = CLIPConfig.from_dict(hf_model.config.to_dict())
    model = CLIPModel(config)
    state = hf_model.state_dict()
    model.load_weights([(k, mx.array(torch_to_mlx(k, v.numpy()))) for k, v in state.items()], strict=True)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_transformers(name):
    spec = CONFIGS[name]
    hf = hf_clip(1, spec.get("text"), spec.get("vision"),
                 **{k: v for k, v in spec.items() if k not in ("text", "vision")})
    model = mlx_from_hf(hf)
    rng = np.random.default_rng(2)
    size = hf.config.vision_config.image_size
    batch = 2 if name == "vit-b32-defaults" else 4
    pixels = random_pixels(rng, batch, size)
    tokens = random_tokens(rng, batch + 1)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(tokens), pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
    out = model(mx.array(tokens.astype(np.int32)), mx.array(pixels))
    assert rel_err(out["image_embeds"], ref.image_embeds.numpy()) <= TOL
    assert rel_err(out["text_embeds"], ref.text_embeds.numpy()) <= TOL
    assert rel_err(out["logits_per_image"], ref.logits_per_image.numpy()) <= TOL


def test_parameter_paths_equal_hf_keys():
    hf = hf_clip(0, CONFIGS["quick_gelu-32px-p8"]["text"], CONFIGS["quick_gelu-32px-p8"]["vision"])
    from mlx.utils import tree_flatten

    model = CLIPModel(CLIPConfig.from_dict(hf.config.to_dict()))
    assert {k for k, _ in tree_flatten(model.parameters())} == set(hf.state_dict())
    for key, value in tree_flatten(model.parameters()):
        assert tuple(torch_to_mlx(key, hf.state_dict()[key].numpy()).shape) == tuple(value.shape), key


def test_interpolated_positions_match_transformers():
    spec = CONFIGS["quick_gelu-32px-p8"]
    hf = hf_clip(3, spec["text"], spec["vision"], projection_dim=24)
    model = mlx_from_hf(hf)
    rng = np.random.default_rng(4)
    for size in (48, 24, 64):
        pixels = random_pixels(rng, 2, size)
        with torch.no_grad():
            ref = hf.get_image_features(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2),
                                        interpolate_pos_encoding=True).pooler_output
        ours = model.get_image_features(mx.array(pixels))
        assert rel_err(ours, ref.numpy()) <= SMALL, size


def test_init_weights_gives_finite_distinct_embeddings():
    from mlx_clip.model.config import tiny_config

    model = CLIPModel(tiny_config())
    init_weights(model, seed=0)
    pixels = mx.array(random_pixels(np.random.default_rng(0), 3, 32))
    feats = np.array(model.get_image_features(pixels))
    assert np.isfinite(feats).all() and np.linalg.matrix_rank(feats) == 3


def test_mlx_save_then_load_is_exact_and_idempotent(tmp_path):
    """MLX files store the conv channels-last with format=mlx; loading must not transpose twice."""
    from mlx.utils import tree_flatten

    from mlx_clip.model.config import tiny_config
    from mlx_clip.mlx_backend.backend import load_mlx_model, save_mlx_model
    from mlx_clip.torch_backend.backend import TorchBackend

    model = CLIPModel(tiny_config())
    init_weights(model, seed=3)
    save_mlx_model(model, tmp_path / "a")
    reloaded = load_mlx_model(tmp_path / "a")
    save_mlx_model(reloaded, tmp_path / "b")
    again = load_mlx_model(tmp_path / "b")
    original = dict(tree_flatten(model.parameters()))
    for name, value in tree_flatten(again.parameters()):
        assert np.array(value).tobytes() == np.array(original[name]).tobytes(), name
    assert mx.load(str(tmp_path / "a" / "model.safetensors"))[
        "vision_model.embeddings.patch_embedding.weight"].shape == (64, 8, 8, 3)  # (out, kh, kw, in)

    pixels = random_pixels(np.random.default_rng(1), 2, 32)
    ours = np.array(model.get_image_features(mx.array(pixels)))
    ours /= np.linalg.norm(ours, axis=-1, keepdims=True)
    torch_view = TorchBackend.from_folder(tmp_path / "b").encode_images(pixels)
    assert rel_err(torch_view, ours) <= SMALL


def test_cpu_exp_is_exact_to_float32_and_differentiable():
    """The polynomial exp the CPU path uses, against numpy's float64 exp: <= 2e-7 relative
    (float32 rounding is 6e-8; Cephes' expf is specified at ~1e-7). Its gradient is exp itself."""
    from mlx_clip.mlx_backend.cpu_math import exp as cpu_exp, softmax

    x = np.concatenate([np.linspace(-87, 88, 20001), np.random.default_rng(0).normal(0, 5, 5000)]).astype(np.float32)
    ours = np.array(cpu_exp(mx.array(x)), dtype=np.float64)
    reference = np.exp(x.astype(np.float64))
    assert np.max(np.abs(ours - reference) / reference) <= 2e-7
    grad = np.array(mx.grad(lambda v: cpu_exp(v).sum())(mx.array(x[:100])))
    np.testing.assert_allclose(grad, np.exp(x[:100].astype(np.float64)), rtol=2e-7)
    scores = np.random.default_rng(1).normal(0, 3, (4, 7)).astype(np.float32)
    expected = np.exp(scores - scores.max(-1, keepdims=True))
    np.testing.assert_allclose(np.array(softmax(mx.array(scores))), expected / expected.sum(-1, keepdims=True),
                               rtol=1e-6, atol=1e-7)
