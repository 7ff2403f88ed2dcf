"""The one tensor whose layout differs between our MLX files and Hugging Face / PyTorch files.

Names are the same everywhere (Hugging Face keys); MLX's Conv2d is channels-last, so the patch
embedding is stored (out, kh, kw, in) in MLX files and (out, in, kh, kw) in torch files. Each
transform has its exact inverse; which one applies is decided by the file's declared format, never
guessed from shapes (a 3x3 patch with 3 channels would be ambiguous). NaFlex SigLIP 2's patch
embedding is a Linear of the same name, stored alike everywhere: a 2-D array is never a convolution.
"""

from __future__ import annotations

PATCH_EMBEDDING = "vision_model.embeddings.patch_embedding.weight"

# name -> (axes torch->mlx, axes mlx->torch); applied with `array.transpose(axes)`.
CHANNELS_LAST = {PATCH_EMBEDDING: ((0, 2, 3, 1), (0, 3, 1, 2))}


def torch_to_mlx(name: str, array):
    axes = CHANNELS_LAST.get(name)
    return array if axes is None or array.ndim != len(axes[0]) else array.transpose(axes[0])


def mlx_to_torch(name: str, array):
    axes = CHANNELS_LAST.get(name)
    return array if axes is None or array.ndim != len(axes[1]) else array.transpose(axes[1])
