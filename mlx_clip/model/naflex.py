"""NaFlex SigLIP 2 (`transformers.Siglip2Model`, model_type "siglip2", e.g.
google/siglip2-base-patch16-naflex), its framework-free parts: the config and the image
preprocessing (the MLX model is `mlx_clip/mlx_backend/siglip2.py`).

NaFlex keeps each image's aspect ratio: the image is resized to the largest multiple of the patch
size that fits `max_num_patches` patches, cut into a (rows, cols) grid of flattened patches, and the
patch rows are zero-padded to `max_num_patches`, with a mask marking the real ones. The model's
square table of position embeddings is resized to each image's (rows, cols) grid.

- preprocessing (`naflex_inputs`) equals transformers' PIL image processor, `Siglip2ImageProcessorPil`
  (the `Siglip2ImageProcessor` of transformers 4), bit for bit: PIL bilinear resize, x/255 in
  float64 then float32, (x - mean) / std in float32. transformers 5's default `Siglip2ImageProcessor`
  (its torchvision backend, chosen whenever torchvision is installed) resizes with torch's uint8
  antialiased kernel and normalizes as (x - 127.5) / 127.5: the same sizes, masks and shapes, pixel
  values within one uint8 level (2/255) of these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from mlx_clip.errors import ConfigError, check_int
from mlx_clip.model.config import SiglipTextConfig, _check_positive, _split_known, _TowerConfig, read_json
from mlx_clip.model.image_processing import SIGLIP_MEAN, SIGLIP_STD, normalize, to_rgb


# ---------------------------------------------------------------------------------------- config

@dataclass
class Siglip2TextConfig(SiglipTextConfig):
    """`transformers.Siglip2TextConfig`: the SigLIP text tower, fields and defaults unchanged."""

    MODEL_TYPE = "siglip2_text_model"


@dataclass
class Siglip2VisionConfig(_TowerConfig):
    """`transformers.Siglip2VisionConfig`: no image size; `num_patches` position embeddings form a
    square grid, resized to each image's patch grid."""

    MODEL_TYPE = "siglip2_vision_model"
    SECTION = "vision_config"

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    vision_use_head: bool = True
    num_patches: int = 256
    extras: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def _normalize(cls, known: dict[str, Any]) -> dict[str, Any]:
        value = known.get("patch_size")
        if isinstance(value, (list, tuple)):  # transformers allows [p, p]
            if len(value) != 2 or value[0] != value[1]:
                raise ConfigError(f"vision_config.patch_size must be square, got {value!r}")
            known["patch_size"] = value[0]
        return known

    def validate(self) -> None:
        super().validate()
        _check_positive(self.SECTION, patch_size=self.patch_size, num_channels=self.num_channels,
                        num_patches=self.num_patches)
        if math.isqrt(self.num_patches) ** 2 != self.num_patches:
            raise ConfigError(f"vision_config.num_patches must be a square number (the position embeddings are a "
                              f"square grid), got {self.num_patches}")
        if self.vision_use_head is not True:
            raise ConfigError("vision_config.vision_use_head must be true: without the attention-pooling head "
                              f"Siglip2Model has no image embedding, got {self.vision_use_head!r}")

    @property
    def grid(self) -> int:
        """The side of the square position-embedding grid."""
        return math.isqrt(self.num_patches)

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch: (patch_size, patch_size, num_channels), row-major."""
        return self.patch_size * self.patch_size * self.num_channels


@dataclass
class Siglip2Config:
    """A whole `Siglip2Model`. Reads a real config.json, keeps unknown keys, writes them back."""

    text_config: Siglip2TextConfig = field(default_factory=Siglip2TextConfig)
    vision_config: Siglip2VisionConfig = field(default_factory=Siglip2VisionConfig)
    model_type: str = "siglip2"
    extras: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def projection_dim(self) -> int:
        """The width of both towers' embeddings."""
        return self.vision_config.hidden_size

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "Siglip2Config":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if data.get("model_type") != "siglip2":
            raise ConfigError(f"{source} is not a NaFlex SigLIP 2 config (model_type={data.get('model_type')!r}, "
                              "expected 'siglip2')")
        known, extras = _split_known(cls, data)
        known.pop("model_type")
        try:
            text = Siglip2TextConfig.from_dict(known.pop("text_config", None) or {})
            vision = Siglip2VisionConfig.from_dict(known.pop("vision_config", None) or {})
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        if text.projection_size != vision.hidden_size:
            raise ConfigError(f"{source}: text_config.projection_size ({text.projection_size}) must equal "
                              f"vision_config.hidden_size ({vision.hidden_size}): SigLIP 2 compares the two "
                              "towers' pooled states directly")
        return cls(text_config=text, vision_config=vision, extras=extras)

    @classmethod
    def from_file(cls, path: str | Path) -> "Siglip2Config":
        return cls.from_dict(read_json(path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return {**self.extras, "architectures": self.extras.get("architectures", ["Siglip2Model"]),
                "model_type": self.model_type, "text_config": self.text_config.to_dict(),
                "vision_config": self.vision_config.to_dict()}


# --------------------------------------------------------------------------------- preprocessing

class NaflexBatch(NamedTuple):
    """What `Siglip2Model` takes for images (transformers' names)."""

    pixel_values: np.ndarray  # (B, max_num_patches, p*p*3) float32, padding rows 0
    pixel_attention_mask: np.ndarray  # (B, max_num_patches) int32, 1 for a real patch
    spatial_shapes: np.ndarray  # (B, 2) int64, each image's (rows, cols) of patches


def naflex_size(height: int, width: int, patch_size: int, max_num_patches: int,
                eps: float = 1e-5) -> tuple[int, int]:
    """The (height, width) in pixels an image is resized to: multiples of `patch_size`, at least one
    patch a side, the aspect ratio kept as closely as at most `max_num_patches` patches allow.

    transformers' `get_image_size_for_max_num_patches` (image_processing_siglip2.py), the same
    bisection on the scale in the same float arithmetic, so the sizes agree exactly."""
    def scaled(scale: float, size: int) -> int:
        return max(patch_size, math.ceil(size * scale / patch_size) * patch_size)

    low, high = eps / 10, 100.0
    while high - low >= eps:
        scale = (low + high) / 2
        patches = (scaled(scale, height) / patch_size) * (scaled(scale, width) / patch_size)
        if patches <= max_num_patches:
            low = scale
        else:
            high = scale
    return scaled(low, height), scaled(low, width)


def patchify(pixels: np.ndarray, patch_size: int) -> np.ndarray:
    """(H, W, C) with H, W multiples of `patch_size` -> (rows * cols, p * p * C): patches in
    row-major order, each flattened as (p, p, C), as transformers' `convert_image_to_patches`."""
    height, width, channels = pixels.shape
    rows, cols = height // patch_size, width // patch_size
    grid = pixels.reshape(rows, patch_size, cols, patch_size, channels).transpose(0, 2, 1, 3, 4)
    return grid.reshape(rows * cols, patch_size * patch_size * channels)  # (rows*cols, p*p*C)


def naflex_patches(image: Image.Image, patch_size: int, max_num_patches: int,
                   mean: Sequence[float] = SIGLIP_MEAN,
                   std: Sequence[float] = SIGLIP_STD) -> tuple[np.ndarray, tuple[int, int]]:
    """One image -> its normalized patches (rows * cols, p * p * 3) float32, unpadded, and its
    (rows, cols). Any Pillow mode: converted to RGB first (transparency onto white), as the
    processor does with `do_convert_rgb=True` (its default refuses other modes than RGB)."""
    check_int("patch_size", patch_size, minimum=1)
    check_int("max_num_patches", max_num_patches, minimum=1)
    rgb = to_rgb(image)
    height, width = naflex_size(rgb.height, rgb.width, patch_size, max_num_patches)
    resized = rgb.resize((width, height), resample=Image.Resampling.BILINEAR)
    pixels = normalize(np.asarray(resized), mean, std)  # (height, width, 3) float32
    return patchify(pixels, patch_size), (height // patch_size, width // patch_size)


def stack_patches(patches: Sequence[np.ndarray], shapes: Sequence[tuple[int, int]],
                  max_num_patches: int) -> NaflexBatch:
    """Per-image patches (as `naflex_patches` gives them) -> one padded batch."""
    if not patches:
        raise ConfigError("a NaFlex batch needs at least one image, got none")
    pixel_values = np.zeros((len(patches), max_num_patches, patches[0].shape[-1]), np.float32)
    mask = np.zeros((len(patches), max_num_patches), np.int32)
    for index, rows in enumerate(patches):
        if len(rows) > max_num_patches:
            raise ConfigError(f"image {index} has {len(rows)} patches, more than max_num_patches ({max_num_patches})")
        pixel_values[index, :len(rows)] = rows
        mask[index, :len(rows)] = 1
    return NaflexBatch(pixel_values, mask, np.asarray(shapes, np.int64).reshape(len(patches), 2))


def naflex_inputs(images: Sequence[Image.Image], patch_size: int, max_num_patches: int,
                  mean: Sequence[float] = SIGLIP_MEAN, std: Sequence[float] = SIGLIP_STD) -> NaflexBatch:
    """PIL images -> (pixel_values, pixel_attention_mask, spatial_shapes), equal bit for bit to
    `Siglip2ImageProcessorPil(...)(images, max_num_patches=N, return_tensors="np")`."""
    per_image = [naflex_patches(image, patch_size, max_num_patches, mean, std) for image in images]
    return stack_patches([p for p, _ in per_image], [s for _, s in per_image], max_num_patches)
