"""--image-size: a checkpoint becomes a model of another resolution, its position embeddings
resampled once exactly as transformers' `interpolate_pos_encoding` resamples them on the fly; the
new size is what final/ says, so it loads at that size everywhere. Tolerance 1e-5 absolute on
L2-normalised embeddings (float32 rounding of two different but equal computations)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner

from mlx_clip.api import load, resolve
from mlx_clip.cli import main
from tests.helpers import random_pixels, save_hf, tiny_hf_clip
from tests.train_helpers import run, small_config


def _normalised(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return save_hf(tiny_hf_clip(seed=11), tmp_path_factory.mktemp("imsize") / "clip")  # 32 px, patch 8


@pytest.mark.parametrize("size", [48, 64])
@pytest.mark.parametrize("engine", ["mlx", "torch"])
def test_equal_to_interpolate_pos_encoding(hf_folder, engine, size):
    reference = transformers.CLIPModel.from_pretrained(hf_folder).eval()
    pixels = random_pixels(np.random.default_rng(size), 3, size)
    with torch.no_grad():
        ref = reference.get_image_features(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2),
                                           interpolate_pos_encoding=True)
    ref = getattr(ref, "pooler_output", ref).numpy()
    clip = load(hf_folder, engine, image_size=size)
    assert clip.image_size == size and clip.config.vision_config.image_size == size
    np.testing.assert_allclose(_normalised(clip.engine.encode_images(pixels)), _normalised(ref), atol=1e-5)


def test_siglip_equal_to_interpolate_pos_encoding():
    folder = resolve("siglip-tiny")
    reference = transformers.SiglipModel.from_pretrained(folder).eval()
    size = 96
    pixels = random_pixels(np.random.default_rng(0), 2, size)
    with torch.no_grad():
        ref = reference.get_image_features(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2),
                                           interpolate_pos_encoding=True)
    ref = getattr(ref, "pooler_output", ref).numpy()
    for engine in ("mlx", "torch"):
        got = load(folder, engine, image_size=size).engine.encode_images(pixels)
        np.testing.assert_allclose(_normalised(got), _normalised(ref), atol=1e-5, err_msg=engine)


@pytest.mark.parametrize("engine", ["mlx", "torch"])
def test_finetuned_at_a_new_size_is_a_model_of_that_size(tmp_path, engine):
    result = run(small_config(tmp_path / "run", engine, steps=2, save_every=0, image_size=48))
    final = result.train.final_model
    config = json.loads((final / "config.json").read_text())
    assert config["vision_config"]["image_size"] == 48
    processor = transformers.CLIPImageProcessor.from_pretrained(final)
    assert processor.size["shortest_edge"] == 48 and processor.crop_size["height"] == 48
    hf = transformers.CLIPModel.from_pretrained(final).eval()  # no interpolation flag needed
    pixels = random_pixels(np.random.default_rng(1), 2, 48)
    with torch.no_grad():
        ref = hf.get_image_features(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
    ref = getattr(ref, "pooler_output", ref).numpy()
    for other in ("mlx", "torch"):
        clip = load(final, other)
        assert clip.image_size == 48
        np.testing.assert_allclose(_normalised(clip.engine.encode_images(pixels)), _normalised(ref), atol=1e-5)


def test_resume_at_a_new_size_is_exact(tmp_path):
    from mlx_clip.training.trainer import Interrupted
    from tests.train_helpers import assert_same_weights, final_weights

    common = dict(steps=4, save_every=2, image_size=48)
    whole = run(small_config(tmp_path / "whole", "mlx", **common))
    with pytest.raises(Interrupted):
        run(small_config(tmp_path / "cut", "mlx", **common), stop_after=2)
    resumed = run(small_config(tmp_path / "cut", "mlx", resume="latest", **common))
    assert resumed.train.losses == whole.train.losses[2:]
    assert_same_weights(final_weights(tmp_path / "whole"), final_weights(tmp_path / "cut"))


def test_embed_and_eval_take_the_size_and_refuse_a_bad_one(tmp_path, hf_folder):
    runner = CliRunner()
    image = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 70, 3), dtype=np.uint8)).save(image)
    ok = runner.invoke(main, ["embed", "--model", str(hf_folder), "--image", str(image), "--image-size", "64",
                              "--out", str(tmp_path / "e.npz")])
    assert ok.exit_code == 0, ok.output
    expected = load(hf_folder, "mlx", image_size=64).encode_images([image])
    np.testing.assert_allclose(np.load(tmp_path / "e.npz")["image_embeds"], expected, atol=1e-6)
    bad = runner.invoke(main, ["embed", "--model", str(hf_folder), "--image", str(image), "--image-size", "50",
                               "--out", str(tmp_path / "f.npz")])
    assert bad.exit_code == 2 and "--image-size 50: must be a positive multiple of the model's patch size 8" \
        in bad.output
