"""The PyTorch engine's model: `transformers.CLIPModel` (or `transformers.SiglipModel` for a
SigLIP config) with sdpa attention, on the best device.

It stands on transformers rather than a second hand-written CLIP: it is the model users already
load, and it brings sdpa attention, gradient checkpointing and position-embedding interpolation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mlx_clip.model.config import CLIPConfig
from mlx_clip.engine.policy import check_dtype, choose_device


def torch_dtype(name: str | None) -> torch.dtype:
    return getattr(torch, check_dtype(name))


def select_device(requested: str | None = None, *, cuda_available: bool | None = None,
                  mps_available: bool | None = None) -> torch.device:
    """MPS > CUDA > CPU, or the user's explicit choice (checked, never silently replaced).

    The availability flags exist so the selection logic can be tested on a machine that has
    neither accelerator."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    mps = torch.backends.mps.is_available() if mps_available is None else mps_available
    return torch.device(choose_device(requested, "torch", {"cuda": cuda, "mps": mps}))


def _family(config: CLIPConfig) -> str:
    """The stem of transformers' classes for `config`'s family."""
    return "Siglip2" if config.is_naflex else "Siglip" if config.is_siglip else "CLIP"


def hf_config(config: CLIPConfig):
    import transformers

    return getattr(transformers, f"{_family(config)}Config").from_dict(config.to_dict())


def build_model(config: CLIPConfig):
    import transformers

    model_class = getattr(transformers, f"{_family(config)}Model")
    return model_class._from_config(hf_config(config), attn_implementation="sdpa")


def pixels_tensor(pixels: np.ndarray, config: CLIPConfig) -> torch.Tensor:
    """The engines' numpy images as transformers takes them, on the CPU in float32: (B, C, H, W)
    from channels-last pixels, or NaFlex's packed patches (`naflex.pack`) as they are (their
    structure columns must stay exact, so the cast to the model's dtype happens on unpacking)."""
    array = np.ascontiguousarray(pixels, dtype=np.float32)
    if config.is_naflex:
        from mlx_clip.model.naflex import check_packed

        check_packed(array, config.vision_config.patch_dim)
        return torch.from_numpy(array)
    return torch.from_numpy(array).permute(0, 3, 1, 2)


def image_features(clip, pixels: torch.Tensor):
    """transformers' image tower output for `pixels_tensor`'s images: interpolated positions for
    square pixels of another size than the model's; unpacked patches, mask and grids for NaFlex."""
    config = clip.config  # transformers' own, which names the family too
    if config.model_type == "siglip2":
        dtype = clip.vision_model.embeddings.patch_embedding.weight.dtype
        return clip.get_image_features(pixel_values=pixels[..., :-3].to(dtype),
                                       pixel_attention_mask=pixels[..., -3].to(torch.int32),
                                       spatial_shapes=pixels[:, 0, -2:].to(torch.int64))
    size = config.vision_config.image_size
    interpolate = tuple(pixels.shape[-2:]) != (size, size)
    return clip.get_image_features(pixel_values=pixels, interpolate_pos_encoding=interpolate)


def load_torch_model(folder: str | Path, *, device: torch.device | None = None, dtype: str | None = None,
                     allow_pickle: bool = False, image_size: int | None = None):
    from mlx_clip.convert import read_checkpoint
    from mlx_clip.convert.resolution import at_image_size

    checkpoint = at_image_size(read_checkpoint(folder, allow_pickle=allow_pickle), image_size)
    model = build_model(checkpoint.config)
    state = {name: torch.from_numpy(array) for name, array in checkpoint.tensors.items()}
    model.load_state_dict(state, strict=True)
    model.to(device=device or torch.device("cpu"), dtype=torch_dtype(dtype))
    return model, checkpoint.config
