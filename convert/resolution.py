"""A checkpoint at another image size: the vision tower's position embeddings resampled to the new
patch grid, bicubically, exactly as transformers' `interpolate_pos_encoding` resamples them on
the fly (the class token's row, for CLIP, is kept), and the config's `image_size` set to it.

Done once, on the weights, so that the model then *is* an N-pixel model: it trains at N, and a
folder saved from it loads at N in both engines and in transformers without any interpolation
flag. Numpy only; both engines call it on the checkpoint they read.
"""

from __future__ import annotations

import copy

import numpy as np

from mlx_clip.convert.checkpoint import Checkpoint
from mlx_clip.errors import ConfigError
from mlx_clip.model.interpolate import bicubic_matrix

POSITIONS = "vision_model.embeddings.position_embedding.weight"


def resample_positions(table: np.ndarray, grid: int, new_grid: int, class_token: bool) -> np.ndarray:
    """(extra + grid², D) -> (extra + new_grid², D), extra = 1 with a class token."""
    head, patches = (table[:1], table[1:]) if class_token else (table[:0], table)
    dim = table.shape[1]
    rows = bicubic_matrix(grid, new_grid).astype(np.float64)
    grid_values = patches.astype(np.float64).reshape(grid, grid, dim)
    resized = np.einsum("ig,ghd,jh->ijd", rows, grid_values, rows)  # rows, then columns
    return np.concatenate([head, resized.reshape(new_grid * new_grid, dim).astype(table.dtype)])


def at_image_size(checkpoint: Checkpoint, image_size: int | None) -> Checkpoint:
    """`checkpoint` as a model for `image_size` pixels (unchanged when None or the same size)."""
    vision = checkpoint.config.vision_config
    if image_size is not None and checkpoint.config.is_naflex:
        raise ConfigError(f"--image-size {image_size}: a NaFlex SigLIP 2 model (model_type 'siglip2') resizes each "
                          "image to its own patch grid, keeping its aspect ratio; give it a patch budget with "
                          "--max-num-patches instead")
    if image_size is None or image_size == vision.image_size:
        return checkpoint
    if not isinstance(image_size, int) or image_size <= 0 or image_size % vision.patch_size:
        raise ConfigError(f"--image-size {image_size}: must be a positive multiple of the model's patch size "
                          f"{vision.patch_size} (it is trained at {vision.image_size})")
    config = copy.deepcopy(checkpoint.config)
    config.vision_config.image_size = image_size
    tensors = dict(checkpoint.tensors)
    tensors[POSITIONS] = resample_positions(tensors[POSITIONS], vision.image_size // vision.patch_size,
                                            image_size // vision.patch_size, class_token=not config.is_siglip)
    return Checkpoint(config, tensors, checkpoint.source_format, checkpoint.folder, checkpoint.extra_tensors,
                      checkpoint.dtypes)
