"""The Python API: `mlx_clip.load(model, backend=...)` -> a model that embeds images and texts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mlx_clip.engine.protocol import Backend, load_backend
from mlx_clip.model.builtin import builtin_configs, materialize
from mlx_clip.model.config import check_quantize, read_json
from mlx_clip.errors import ConfigError
from mlx_clip.model.hub import resolve_model
from mlx_clip.model.image_processing import OPENAI_MEAN, OPENAI_STD, SIGLIP_MEAN, SIGLIP_STD, open_image, preprocess
from mlx_clip.model.tokenizer import load_tokenizer


# How many images / texts reach the engine at once when embedding or evaluating; the default of
# every function that batches, and of `--batch-size`.
IMAGE_BATCH = 64
TEXT_BATCH = 256


def resolve(model: str | Path, *, allow_pickle: bool = False) -> Path:
    """A folder for `model`: a path, a built-in name (`tiny`, `vit-b32`), or a hub id."""
    if isinstance(model, str) and model in builtin_configs() and not Path(model).exists():
        return materialize(model)
    return resolve_model(model, allow_pickle=allow_pickle)


def preprocessor_stats(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std a model folder was trained with (preprocessor_config.json), else its family's."""
    mean, std, _ = preprocessor_settings(folder)
    return mean, std


def preprocessor_settings(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...], bool]:
    """(mean, std, crop) from the folder's preprocessor_config.json: crop is CLIP's center crop
    (`do_center_crop`, or a `shortest_edge` size), False for SigLIP's square resize. Without the
    file, the family's defaults: OpenAI's stats with a crop, or SigLIP's 0.5 / 0.5 without."""
    from mlx_clip.model.siglip_tokenizer import is_siglip_folder

    siglip = is_siglip_folder(folder)
    default_mean, default_std = (SIGLIP_MEAN, SIGLIP_STD) if siglip else (OPENAI_MEAN, OPENAI_STD)
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        mean, std = _open_clip_normalisation(folder)
        return mean or default_mean, std or default_std, not siglip
    data = read_json(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a valid preprocessor config (expected a JSON object)")
    size = data.get("size")
    crop = data.get("do_center_crop", isinstance(size, dict) and "shortest_edge" in size)
    return tuple(data.get("image_mean", default_mean)), tuple(data.get("image_std", default_std)), bool(crop)


def _open_clip_normalisation(folder: Path) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """An open_clip folder keeps its mean/std in open_clip_config.json's preprocess_cfg."""
    path = folder / "open_clip_config.json"
    if not path.is_file():
        return None, None
    data = read_json(path)
    cfg = data.get("preprocess_cfg") if isinstance(data, dict) else None
    if not isinstance(cfg, dict):
        return None, None
    pick = lambda key: tuple(float(v) for v in cfg[key]) if isinstance(cfg.get(key), list) else None  # noqa: E731
    return pick("mean"), pick("std")


class CLIP:
    """One loaded model: an engine plus the tokenizer and image transform that go with it."""

    def __init__(self, engine: Backend, folder: Path):
        self.engine = engine
        self.folder = folder
        self.config = engine.config
        self.image_size = engine.config.vision_config.image_size
        self.tokenizer = load_tokenizer(folder)
        self.mean, self.std, self.crop = preprocessor_settings(folder)

    def preprocess(self, images: Sequence) -> np.ndarray:
        return np.stack([preprocess(open_image(im), self.image_size, mean=self.mean, std=self.std, crop=self.crop)
                         for im in images])

    def encode_images(self, images: Sequence | np.ndarray, batch_size: int = IMAGE_BATCH) -> np.ndarray:
        """Paths, bytes or PIL images (or already-preprocessed (B,H,W,3) pixels) -> (B, P)."""
        parts = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            pixels = chunk if isinstance(chunk, np.ndarray) else self.preprocess(chunk)
            parts.append(self.engine.encode_images(pixels))
        return np.concatenate(parts) if parts else np.zeros((0, self.config.projection_dim), np.float32)

    def encode_texts(self, texts: Sequence[str] | np.ndarray, batch_size: int = TEXT_BATCH) -> np.ndarray:
        parts = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            ids = chunk if isinstance(chunk, np.ndarray) else self.tokenizer.trim(self.tokenizer.encode(list(chunk)))
            parts.append(self.engine.encode_texts(ids))
        return np.concatenate(parts) if parts else np.zeros((0, self.config.projection_dim), np.float32)


def load(model: str | Path, backend: str = "mlx", *, device: str | None = None, dtype: str | None = None,
         allow_pickle: bool = False, image_size: int | None = None, quantize: int | None = None) -> CLIP:
    """`image_size`: run the model at that many pixels (position embeddings resampled once).
    `quantize` (8 or 4): the MLX engine runs the Linears with that many bits per weight."""
    check_quantize(quantize)  # before a hub download or a built-in model is written
    folder = resolve(model, allow_pickle=allow_pickle)
    engine = load_backend(backend, folder, device=device, dtype=dtype, allow_pickle=allow_pickle,
                          image_size=image_size, quantize=quantize)
    return CLIP(engine, folder)
