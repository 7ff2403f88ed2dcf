"""The Python API: `mlx_clip.load(model, backend=...)` -> a model that embeds images and texts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlx_clip.engine.policy import check_patch_budget
from mlx_clip.engine.protocol import Backend, load_backend
from mlx_clip.model.builtin import builtin_configs, materialize
from mlx_clip.model.config import CLIPConfig, check_quantize, read_json
from mlx_clip.errors import ConfigError, check_int
from mlx_clip.model.naflex import NaflexProcessor
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


def folder_max_num_patches(folder: Path, config: CLIPConfig) -> int:
    """NaFlex: the patch budget of the folder's preprocessor_config.json (`max_num_patches`), else
    the position grid's patch count (256 for google/siglip2-*-naflex, their processors' default)."""
    path = folder / "preprocessor_config.json"
    data = read_json(path) if path.is_file() else {}
    value = data.get("max_num_patches", config.vision_config.num_patches) if isinstance(data, dict) else None
    return check_int(f"{path}: max_num_patches", value, minimum=1)


@dataclass(frozen=True)
class SquareProcessor:
    """CLIP's and SigLIP's transform: a resize (and CLIP's center crop) to `image_size`."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop: bool

    def __call__(self, image) -> np.ndarray:
        return preprocess(image, self.image_size, mean=self.mean, std=self.std, crop=self.crop)


def image_processor(folder: Path, config: CLIPConfig, max_num_patches: int | None = None):
    """One image (PIL) -> what the engines take for it, as the folder's preprocessor says: square
    (H, W, 3) pixels, or NaFlex's packed patches within `max_num_patches` (default: the folder's)."""
    check_patch_budget(config, max_num_patches)
    mean, std, crop = preprocessor_settings(folder)
    if config.is_naflex:
        return NaflexProcessor(config.vision_config.patch_size, max_num_patches or folder_max_num_patches(folder, config),
                               tuple(mean), tuple(std))
    return SquareProcessor(config.vision_config.image_size, tuple(mean), tuple(std), crop)


class CLIP:
    """One loaded model: an engine plus the tokenizer and image transform that go with it."""

    def __init__(self, engine: Backend, folder: Path, max_num_patches: int | None = None):
        self.engine = engine
        self.folder = folder
        self.config = engine.config
        self.image_size = engine.config.vision_config.image_size
        self.tokenizer = load_tokenizer(folder)
        self.mean, self.std, self.crop = preprocessor_settings(folder)
        self.processor = image_processor(folder, self.config, max_num_patches)
        # NaFlex: the patch budget every image is sized to (None for square models).
        self.max_num_patches = getattr(self.processor, "max_num_patches", None)

    def preprocess(self, images: Sequence) -> np.ndarray:
        return np.stack([self.processor(open_image(im)) for im in images])

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
         allow_pickle: bool = False, image_size: int | None = None, quantize: int | None = None,
         max_num_patches: int | None = None) -> CLIP:
    """`image_size`: run the model at that many pixels (position embeddings resampled once).
    `quantize` (8 or 4): the MLX engine runs the Linears with that many bits per weight.
    `max_num_patches`: NaFlex SigLIP 2's patch budget per image (default: the folder's)."""
    check_quantize(quantize)  # before a hub download or a built-in model is written
    folder = resolve(model, allow_pickle=allow_pickle)
    config_file = folder / "config.json"
    if max_num_patches is not None and config_file.is_file():  # before any weight is read
        check_patch_budget(CLIPConfig.from_file(config_file), max_num_patches)
    engine = load_backend(backend, folder, device=device, dtype=dtype, allow_pickle=allow_pickle,
                          image_size=image_size, quantize=quantize)
    return CLIP(engine, folder, max_num_patches)
