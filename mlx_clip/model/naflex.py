"""NaFlex SigLIP 2 (`transformers.Siglip2Model`, model_type "siglip2", e.g.
google/siglip2-base-patch16-naflex), its framework-free part: the image preprocessing and the one
array a batch of images travels in (the config is `config.Siglip2VisionConfig`, the MLX model
`mlx_clip/mlx_backend/siglip2.py`, the torch one transformers').

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
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image

from mlx_clip.errors import ConfigError, check_int
from mlx_clip.model.image_processing import SIGLIP_MEAN, SIGLIP_STD, normalize, to_rgb


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


# ------------------------------------------------------------------------------ the packed batch
#
# Every path a batch of images takes (the loader's stacking, the engines' row slicing for feature
# caching, CPU streams and distributed shards, the server's micro-batches) handles one array whose
# first axis is the image. So NaFlex images travel as one float32 array too, (B, L, p*p*C + 3): each
# row a patch's values, then 1/0 for a real/padding patch, then the image's patch rows and columns
# (the same on every row of an image; small integers, exact in float32). Each engine unpacks it
# where the model takes it.

STRUCTURE_COLUMNS = 3  # mask, rows, cols


def pack(batch: NaflexBatch) -> np.ndarray:
    """(pixel_values, pixel_attention_mask, spatial_shapes) -> (B, L, p*p*C + 3) float32."""
    values, mask, shapes = batch
    count, length, _ = values.shape
    structure = np.empty((count, length, STRUCTURE_COLUMNS), np.float32)
    structure[..., 0] = mask
    structure[..., 1:] = np.asarray(shapes, np.float32)[:, None, :]
    return np.concatenate([np.asarray(values, np.float32), structure], axis=-1)


def unpack(packed: np.ndarray) -> NaflexBatch:
    """The inverse of `pack`: transformers' three inputs (mask int32, shapes int64)."""
    packed = np.asarray(packed)
    return NaflexBatch(packed[..., :-STRUCTURE_COLUMNS], packed[..., -3].astype(np.int32),
                       packed[:, 0, -2:].astype(np.int64))


def check_packed(pixels, patch_dim: int, where: str = "images") -> None:
    """A ConfigError naming the shape when `pixels` is not a packed NaFlex batch of this model
    (e.g. square (B, H, W, 3) pixels made for another family)."""
    shape = tuple(getattr(pixels, "shape", ()))
    if len(shape) != 3 or shape[-1] != patch_dim + STRUCTURE_COLUMNS:
        raise ConfigError(f"{where}: a NaFlex SigLIP 2 model takes images as patches (B, max_num_patches, "
                          f"{patch_dim} + {STRUCTURE_COLUMNS}) made by mlx_clip.model.naflex.NaflexProcessor, "
                          f"got an array of shape {shape}")


@dataclass(frozen=True)
class NaflexProcessor:
    """One image -> its packed rows (max_num_patches, p*p*3 + 3), as `Siglip2ImageProcessorPil`
    makes it; the model folder's mean and std."""

    patch_size: int
    max_num_patches: int
    mean: tuple[float, ...] = SIGLIP_MEAN
    std: tuple[float, ...] = SIGLIP_STD

    def __post_init__(self) -> None:
        check_int("patch_size", self.patch_size, minimum=1)
        check_int("max_num_patches", self.max_num_patches, minimum=1)

    def __call__(self, image: Image.Image) -> np.ndarray:
        patches, shape = naflex_patches(image, self.patch_size, self.max_num_patches, self.mean, self.std)
        return pack(stack_patches([patches], [shape], self.max_num_patches))[0]
