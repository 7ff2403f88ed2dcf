"""LoRA for the MLX engine: low-rank adapters on the attention and MLP Linears of either tower.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models": a frozen Linear W gains a
trainable update, y = W x + b + (alpha / rank) * B (A dropout(x)), with A (rank, in) and B (out, rank).

`torch_backend/lora.py` is the twin for the torch engine: same functions, same parameter names,
same initialisation from the same numpy seed, so both engines start a run from equal weights. The
framework-free part (site walk, option checks, A initialisation, merged copy) lives once in
`mlx_clip/engine/lora_sites.py`.

- Names: an adapted Linear at `<path>` holds `<path>.base.weight`, `<path>.base.bias`,
  `<path>.lora_a`, `<path>.lora_b` in both engines, so a full state dict of an adapted model
  saves and restores by name (exact resume) and moves between engines like any other checkpoint.
  `merge_lora` folds the update into the base and gives back the plain Hugging Face names.
- Init: A ~ U(-1/sqrt(in), 1/sqrt(in)), which is torch's `kaiming_uniform_(a=sqrt(5))` as PEFT
  uses for `lora_A` (and mlx-lm's bound), drawn in float64 by
  `np.random.default_rng([seed, index])` where `index` numbers every *possible* site (text tower
  before vision, layer by layer, in `ALL_TARGETS` order) so a site's A depends only on the seed and
  the site, not on which other sites are adapted. B = 0: the model is unchanged at step 0.
- A and B take the dtype of the base weight.
"""

from __future__ import annotations

import math
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_clip.engine import lora_sites
# Re-exported: callers know these as part of each engine's LoRA module.
from mlx_clip.engine.lora_sites import (  # noqa: F401
    ALL_TARGETS, ALL_TOWERS, check_lora_options, init_lora_a, lora_modules, lora_parameter_names)


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update (see the module docstring)."""

    def __init__(self, base: nn.Linear, lora_a: np.ndarray, alpha: float, dropout: float = 0.0):
        super().__init__()
        out_features = base.weight.shape[0]
        rank = lora_a.shape[0]
        self.base = base
        self.lora_a = mx.array(lora_a).astype(base.weight.dtype)  # (rank, in)
        self.lora_b = mx.zeros((out_features, rank), dtype=base.weight.dtype)  # (out, rank)
        self.alpha = float(alpha)
        self.scale = float(alpha) / rank
        # No dropout module at p = 0, so the forward pass never touches the RNG.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def __call__(self, x: mx.array) -> mx.array:
        h = self.dropout(x) if self.dropout is not None else x
        update = (h @ self.lora_a.T) @ self.lora_b.T
        return self.base(x) + (self.scale * update).astype(x.dtype)

    def merged_weight(self) -> mx.array:
        """W + (alpha / rank) B A, computed in float32 and returned in the base weight's dtype."""
        weight = self.base.weight
        delta = self.lora_b.astype(mx.float32) @ self.lora_a.astype(mx.float32)  # (out, in)
        return (weight.astype(mx.float32) + self.scale * delta).astype(weight.dtype)


def apply_lora(model: nn.Module, *, rank: int, alpha: float,
               targets: Sequence[str] = ALL_TARGETS, towers: Sequence[str] = ALL_TOWERS,
               dropout: float = 0.0, seed: int = 0) -> int:
    """Wrap each targeted Linear of `model` (an `mlx_clip.mlx_backend.model.CLIPModel`) in a `LoRALinear`, in
    place, and freeze everything but the LoRA tensors. Returns the number of trainable parameters.

    The caller may unfreeze more afterwards, e.g. `model.unfreeze(keys=["logit_scale"], recurse=False)`.
    """
    lora_sites.wrap_sites(model, LoRALinear, rank=rank, alpha=alpha, targets=targets, towers=towers,
                         dropout=dropout, seed=seed)
    model.freeze()
    for _, lora in lora_modules(model):
        lora.unfreeze(keys=["lora_a", "lora_b"], recurse=False)
    return sum(int(math.prod(p.shape)) for _, p in tree_flatten(model.trainable_parameters()))


def merge_lora(model: nn.Module) -> None:
    """Replace every `LoRALinear` by its base Linear holding W + (alpha / rank) B A (bias as it
    was), so the model has the plain Hugging Face names and shapes again."""
    for _, parent, name, lora in list(lora_sites.adapted_sites(model)):
        # The base module keeps its frozen flags: merging changes values, not what trains.
        lora.base.weight = lora.merged_weight()
        setattr(parent, name, lora.base)


def merged(model: nn.Module) -> nn.Module:
    """`model`, or a copy with its adapters folded in (plain Hugging Face names) when it has any."""
    return lora_sites.merged(model, merge_lora)
