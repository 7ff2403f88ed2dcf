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
