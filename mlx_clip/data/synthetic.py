"""Seeded stand-in inputs for the work that needs no real data: verifying a conversion or an
export, probing a step's memory, timing a step in the benchmarks. One generator for all of them,
so their inputs mean the same thing."""

from __future__ import annotations

import numpy as np

from mlx_clip.data.collate import Batch
from mlx_clip.model.config import CLIPConfig


def synthetic_inputs(config: CLIPConfig, batch: int, seed: int = 0, length: int | None = None, *,
                     end: str = "random") -> tuple[np.ndarray, np.ndarray]:
    """(pixels (B,H,W,3) float32, token ids (B,L) int64), L = `length` (at least 2) or the full
    context, with one end-of-text token per row where the config's pooling will find it (its
    `eos_token_id`, or the row's maximum for the legacy id 2): at a random place (`end="random"`:
    a verification then checks pooling at several positions), or last (`end="last"`: the longest
    text, the most a step holds)."""
    rng = np.random.default_rng(seed)
    v, t = config.vision_config, config.text_config
    if config.is_naflex:
        pixels = _naflex_pixels(config, batch, rng, full=end == "last")
    else:
        pixels = rng.standard_normal((batch, v.image_size, v.image_size, v.num_channels)).astype(np.float32)
    length, vocab, eos = length or t.max_position_embeddings, t.vocab_size, t.eos_token_id
    legacy = eos == 2
    top = vocab - 1 if legacy else vocab
    ids = rng.integers(0, top, size=(batch, length)).astype(np.int64)
    if not legacy and eos < vocab:
        ids[ids == eos] = (eos + 1) % vocab
    for row in range(batch):
        position = int(rng.integers(1, length)) if end == "random" else length - 1
        ids[row, position] = vocab - 1 if legacy else (eos if eos < vocab else ids[row, position])
        ids[row, position + 1:] = 0
    return pixels, ids


def synthetic_batch(config: CLIPConfig, batch_size: int, seed: int = 0) -> Batch:
    """A training batch of full-length texts, every pair its own positive."""
    pixels, ids = synthetic_inputs(config, batch_size, seed, end="last")
    return Batch(pixels, ids, None, np.arange(batch_size), np.arange(batch_size))


def _naflex_pixels(config: CLIPConfig, batch: int, rng: np.random.Generator, *, full: bool) -> np.ndarray:
    """Packed NaFlex patches (`naflex.pack`) within the position grid's patch count: every image
    the full square grid (`full`: the most a step holds), else grids of random aspect ratios with
    padding, as a verification should see."""
    from mlx_clip.model.naflex import pack, stack_patches

    v = config.vision_config
    length = v.num_patches
    shapes = []
    for _ in range(batch):
        rows = v.grid if full else int(rng.integers(1, 2 * v.grid + 1))
        shapes.append((rows, v.grid if full else max(1, int(rng.integers(1, length // rows + 1)))))
    patches = [rng.standard_normal((r * c, v.patch_dim)).astype(np.float32) for r, c in shapes]
    return pack(stack_patches(patches, shapes, length))
