"""LoRA for the torch engine: the twin of `mlx_clip/mlx_backend/lora.py` (same functions, same
parameter names `<path>.base.weight`, `<path>.lora_a`, `<path>.lora_b`, same initialisation from
the same numpy seed); the formulas and choices are documented there.

The site walk, option checks and A initialisation are numpy-only and shared with the MLX engine
through `mlx_clip/engine/lora_sites.py` (this module may not import the MLX one: each engine imports only
its own framework); `tests/test_lora.py` holds the two engines to identical results.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mlx_clip.engine import lora_sites
# Re-exported: callers know these as part of each engine's LoRA module.
from mlx_clip.engine.lora_sites import (  # noqa: F401
    ALL_TARGETS, ALL_TOWERS, check_lora_options, init_lora_a, lora_modules, lora_parameter_names)


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update: base(x) + (alpha/rank) B A dropout(x)."""

    def __init__(self, base: nn.Linear, lora_a: np.ndarray, alpha: float, dropout: float = 0.0):
        super().__init__()
        weight = base.weight
        rank = lora_a.shape[0]
        self.base = base
        self.lora_a = nn.Parameter(torch.from_numpy(lora_a).to(device=weight.device, dtype=weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(weight.shape[0], rank, device=weight.device, dtype=weight.dtype))
        self.alpha = float(alpha)
        self.scale = float(alpha) / rank
        # Identity at p = 0, so the forward pass never touches the RNG.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b)
        return self.base(x) + (self.scale * update).to(x.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / rank) B A, computed in float32 and returned in the base weight's dtype."""
        weight = self.base.weight
        delta = self.lora_b.float() @ self.lora_a.float()  # (out, in)
        return (weight.float() + self.scale * delta).to(weight.dtype)


def apply_lora(model: nn.Module, *, rank: int, alpha: float,
               targets: Sequence[str] = ALL_TARGETS, towers: Sequence[str] = ALL_TOWERS,
               dropout: float = 0.0, seed: int = 0) -> int:
    """Wrap each targeted Linear of `model` (a `transformers.CLIPModel`) in a `LoRALinear`, in
    place, and set `requires_grad` on the LoRA tensors only. Returns the number of trainable
    parameters. The caller may re-enable more afterwards, e.g. `model.logit_scale.requires_grad_()`.
    """
    lora_sites.wrap_sites(model, LoRALinear, rank=rank, alpha=alpha, targets=targets, towers=towers,
                         dropout=dropout, seed=seed)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for _, lora in lora_modules(model):
        lora.lora_a.requires_grad_(True)
        lora.lora_b.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: nn.Module) -> None:
    """Replace every `LoRALinear` by its base Linear holding W + (alpha / rank) B A (bias as it
    was), so `save_pretrained` writes the plain Hugging Face names and shapes."""
    for _, parent, name, lora in list(lora_sites.adapted_sites(model)):
        merged = lora.merged_weight()
        with torch.no_grad():
            lora.base.weight.copy_(merged)
        setattr(parent, name, lora.base)


def merged(model: nn.Module) -> nn.Module:
    """`model`, or a copy with its adapters folded in (plain Hugging Face names) when it has any."""
    return lora_sites.merged(model, merge_lora)
