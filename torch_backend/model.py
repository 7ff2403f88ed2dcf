"""The PyTorch engine's model: `transformers.CLIPModel` (or `transformers.SiglipModel` for a
SigLIP config) with sdpa attention, on the best device.

It stands on transformers rather than a second hand-written CLIP: it is the model users already
load, and it brings sdpa attention, gradient checkpointing and position-embedding interpolation.
"""

from __future__ import annotations

from pathlib import Path

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


def hf_config(config: CLIPConfig):
    import transformers

    if config.is_siglip:
        return transformers.SiglipConfig.from_dict(config.to_dict())
    return transformers.CLIPConfig.from_dict(config.to_dict())


def build_model(config: CLIPConfig):
    import transformers

    model_class = transformers.SiglipModel if config.is_siglip else transformers.CLIPModel
    return model_class._from_config(hf_config(config), attn_implementation="sdpa")


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
