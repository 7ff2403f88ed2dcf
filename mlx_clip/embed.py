"""`mlxclip embed`: images and texts -> L2-normalised embeddings in an .npz, one row per input."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mlx_clip.api import load
from mlx_clip.errors import ConfigError
from mlx_clip.outputs import check_file


def embed(model: str | Path, *, images: Sequence[str | Path] = (), texts: Sequence[str] = (),
          out: str | Path, backend: str = "mlx", device: str | None = None, dtype: str | None = None,
          allow_pickle: bool = False, image_size: int | None = None,
          quantize: int | None = None, max_num_patches: int | None = None) -> dict[str, np.ndarray]:
    if not images and not texts:
        raise ConfigError("nothing to embed: give at least one --image or --text")
    out = Path(out)
    if out.suffix != ".npz":
        raise ConfigError(f"--out must end in .npz, got {out}")
    check_file(out)  # before the model is loaded and every input embedded
    clip = load(model, backend, device=device, dtype=dtype, allow_pickle=allow_pickle, image_size=image_size,
                quantize=quantize, max_num_patches=max_num_patches)
    dim = clip.config.projection_dim
    arrays = {
        "image_embeds": clip.encode_images(list(images)) if images else np.zeros((0, dim), np.float32),
        "text_embeds": clip.encode_texts(list(texts)) if texts else np.zeros((0, dim), np.float32),
        "images": np.array([str(p) for p in images], dtype=str),
        "texts": np.array(list(texts), dtype=str),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    return arrays
