"""`mlxclip eval` streams: encoding a dataset holds a batch of pixels, not the dataset, so its peak
memory does not grow with the number of images (tracemalloc, 1,000 against 10,000 images)."""

import mlx_clip  # noqa: F401  (first, as everywhere)

import io
import tracemalloc

import numpy as np
from PIL import Image

from mlx_clip.api import CLIP
from mlx_clip.data.sample import Sample
from mlx_clip.evaluation.encode import encode_dataset
from mlx_clip.model.config import tiny_config


class FakeEngine:
    """Embeddings from pixel means: no model, so the measurement is the pipeline's own memory."""

    name = "fake"

    def __init__(self, image_size: int, dim: int):
        self.config = tiny_config(vision=dict(image_size=image_size), projection_dim=dim)
        self.dim = dim

    def encode_images(self, pixels):
        feats = np.ones((len(pixels), self.dim), np.float32)
        feats[:, :3] = pixels.mean(axis=(1, 2))
        return feats / np.linalg.norm(feats, axis=1, keepdims=True)

    def encode_texts(self, ids):
        feats = np.asarray(ids[:, :self.dim], np.float32) + 1
        return feats / np.linalg.norm(feats, axis=1, keepdims=True)


def _peak_bytes(clip, samples) -> tuple[int, object]:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        enc = encode_dataset(clip, samples, batch_size=256, workers=1)
        return tracemalloc.get_traced_memory()[1] - before, enc
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_dataset(tmp_path):
    rng = np.random.default_rng(0)
    variants = []
    for _ in range(16):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(buffer, format="PNG")
        variants.append(buffer.getvalue())
    folder = tmp_path / "images"
    folder.mkdir()
    samples = []
    for i in range(10_000):
        path = folder / f"{i:05d}.png"
        path.write_bytes(variants[i % 16])
        samples.append(Sample(path, f"picture {i}", i % 10, i))
    clip = CLIP(FakeEngine(image_size=32, dim=8), tmp_path)
    small, enc_small = _peak_bytes(clip, samples[:1000])
    large, enc_large = _peak_bytes(clip, samples)
    assert enc_small.image_embeds.shape == (1000, 8) and enc_large.image_embeds.shape == (10_000, 8)
    assert enc_large.text_embeds.shape == (10_000, 8) and enc_large.labels.tolist()[:3] == [0, 1, 2]
    batch_bytes = 256 * 32 * 32 * 3 * 4  # one batch of preprocessed pixels
    assert small >= batch_bytes  # the measurement sees the batch ...
    assert large <= 1.5 * small, (small, large)  # ... and 10x the images adds only their embeddings
    # Holding every preprocessed image instead would take 10,000 x 32 x 32 x 3 x 4 bytes (~123 MB).
