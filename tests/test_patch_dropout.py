"""--patch-dropout (FLIP, Li et al. 2023; open_clip's PatchDropout) in both engines.

The reference is written here, outside both engines: transformers' own vision embeddings (class
token and positions added), the kept rows gathered with numpy indexing, then transformers' own
pre-norm, encoder, post-norm and projection (CLIP) or encoder, post-norm and attention head
(SigLIP). MLX is held to it within the model-parity tolerance (float32; measured below), the torch
engine's hook exactly (it is the same transformers computation).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mlx.core as mx
from mlx_clip.training.interruption import Interrupted
from mlx_clip.training.patch_dropout import keep_indices, kept_count
from tests.helpers import hf_clip, rel_err
from tests.test_model_parity import mlx_from_hf
from tests.test_siglip import CONFIGS as SIGLIP_SPECS, hf_siglip, mlx_siglip
from tests.train_helpers import assert_same_weights, final_weights, run, small_config

TOL = 1e-5  # relative L2, as tests/test_model_parity.py; measured 2.4e-7 (CLIP) and 4.4e-7 (SigLIP) here


def test_the_draw_is_open_clips_count_seeded_and_sorted():
    for patches, rate in ((49, 0.5), (16, 0.75), (4, 0.99), (196, 0.1)):
        assert kept_count(patches, rate) == max(1, int(patches * (1 - rate)))  # open_clip's PatchDropout
        keep = keep_indices(7, 3, 5, patches, rate)
        assert keep.shape == (5, kept_count(patches, rate)) and keep.dtype == np.int32
        assert all(len(set(row)) == len(row) and (np.diff(row) > 0).all() for row in keep.tolist())
        assert keep.min() >= 0 and keep.max() < patches
        assert (keep == keep_indices(7, 3, 5, patches, rate)).all()  # the seed and the step decide
    assert not (keep_indices(7, 3, 5, 49, 0.5) == keep_indices(7, 4, 5, 49, 0.5)).all()
    assert not (keep_indices(7, 3, 5, 49, 0.5) == keep_indices(8, 3, 5, 49, 0.5)).all()


def _reference_clip(hf, pixels: torch.Tensor, keep: np.ndarray) -> np.ndarray:
    vm = hf.vision_model
    with torch.no_grad():
        tokens = vm.embeddings(pixels)  # (B, 1+N, D): class token and positions added
        rows = [torch.cat([t[:1], t[1:][torch.from_numpy(k.astype(np.int64))]]) for t, k in zip(tokens, keep)]
        hidden = vm.pre_layrnorm(torch.stack(rows))
        hidden = vm.encoder(inputs_embeds=hidden).last_hidden_state
        return hf.visual_projection(vm.post_layernorm(hidden[:, 0])).numpy()


def _reference_siglip(hf, pixels: torch.Tensor, keep: np.ndarray) -> np.ndarray:
    vm = hf.vision_model
    with torch.no_grad():
        tokens = vm.embeddings(pixels)  # (B, N, D): positions added, no class token
        rows = [t[torch.from_numpy(k.astype(np.int64))] for t, k in zip(tokens, keep)]
        hidden = vm.encoder(inputs_embeds=torch.stack(rows)).last_hidden_state
        return vm.head(vm.post_layernorm(hidden)).numpy()


def _torch_engine_features(hf, pixels: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """transformers' image features under the torch engine's hook (`kept_patches`); None: none."""
    from mlx_clip.torch_backend.train import kept_patches

    with torch.no_grad(), kept_patches(hf, None if keep is None else torch.from_numpy(keep)):
        return hf.get_image_features(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).pooler_output.numpy()


def test_clip_towers_keep_the_drawn_patches():
    hf = hf_clip(1, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
                 dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3, image_size=40,
                      patch_size=8), projection_dim=24)
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((3, 40, 40, 3)).astype(np.float32)
    keep = keep_indices(0, 5, 3, 25, 0.5)
    expected = _reference_clip(hf, torch.from_numpy(pixels).permute(0, 3, 1, 2), keep)
    got = np.array(mlx_from_hf(hf).get_image_features(mx.array(pixels), mx.array(keep)))
    assert rel_err(got, expected) < TOL
    np.testing.assert_array_equal(_torch_engine_features(hf, pixels, keep), expected)
    assert rel_err(_torch_engine_features(hf, pixels), expected) > 1e-3  # outside the hook every patch is back


def test_siglip_towers_keep_the_drawn_patches():
    spec = SIGLIP_SPECS["tanh-32px-p8"]
    hf = hf_siglip(2, spec)
    size = spec["vision"]["image_size"]
    patches = (size // spec["vision"]["patch_size"]) ** 2
    rng = np.random.default_rng(1)
    pixels = rng.standard_normal((4, size, size, 3)).astype(np.float32)
    keep = keep_indices(3, 1, 4, patches, 0.75)
    expected = _reference_siglip(hf, torch.from_numpy(pixels).permute(0, 3, 1, 2), keep)
    got = np.array(mlx_siglip(hf).get_image_features(mx.array(pixels), mx.array(keep)))
    assert rel_err(got, expected) < TOL
    np.testing.assert_array_equal(_torch_engine_features(hf, pixels, keep), expected)


def test_engines_agree_and_dropout_changes_the_run(tmp_path):
    """Both engines over 6 steps at 0.5: the same losses (relative 1e-5, ~15x the 6.7e-7 measured
    here), and not the losses of a run without it."""
    losses = {}
    for engine in ("mlx", "torch"):
        losses[engine] = run(small_config(tmp_path / engine, engine, steps=6, save_every=0,
                                          patch_dropout=0.5)).train.losses
    plain = run(small_config(tmp_path / "plain", "mlx", steps=6, save_every=0)).train.losses
    np.testing.assert_allclose(losses["mlx"], losses["torch"], rtol=1e-5)
    assert losses["mlx"][0] != pytest.approx(plain[0], rel=1e-4)


@pytest.mark.parametrize("engine", ["mlx", "torch"])
def test_resume_draws_what_the_uninterrupted_run_drew(tmp_path, engine):
    whole = run(small_config(tmp_path / "whole", engine, steps=8, save_every=4, patch_dropout=0.5))
    cut_cfg = small_config(tmp_path / "cut", engine, steps=8, save_every=4, patch_dropout=0.5)
    with pytest.raises(Interrupted):
        run(cut_cfg, stop_after=4)
    resumed = run(small_config(tmp_path / "cut", engine, steps=8, save_every=4, patch_dropout=0.5, resume="latest"))
    assert resumed.train.losses == whole.train.losses[4:]
    assert_same_weights(final_weights(tmp_path / "whole"), final_weights(tmp_path / "cut"))


def test_micro_batches_equal_the_whole_batch(tmp_path):
    """Feature caching slices the drawn indices with the pixels: the same update up to float32
    summation order (relative 1.5e-7 measured; 2e-6 allowed)."""
    whole = run(small_config(tmp_path / "whole", "mlx", steps=3, save_every=0, patch_dropout=0.5)).train.losses
    cached = run(small_config(tmp_path / "cached", "mlx", steps=3, save_every=0, patch_dropout=0.5,
                              micro_batch_size=3)).train.losses
    np.testing.assert_allclose(cached, whole, rtol=2e-6)


@pytest.mark.parametrize("value", ["1", "nan"])
def test_a_bad_rate_is_one_line(value):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "mlx_clip", "finetune", "--patch-dropout", value, "--steps", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--patch-dropout" in lines[0], done.stderr


def test_the_benchmark_times_both_variants_with_the_trainers_draw():
    from mlx_clip.benchmarks.patch_dropout import measure

    result = measure("mlx", "tiny", 8, 0.5, rounds=1)
    assert result["patches"] == 16 and set(result["median_seconds"]) == {"all patches", "patch dropout 0.5"}
    assert all(len(times) == 1 and times[0] > 0 for times in result["seconds"].values())
    full, dropped = result["median_seconds"].values()
    assert result["speedup"] == pytest.approx(full / dropped)
