"""LoRA for the torch engine: the twin of `mlx_clip/lora.py` (same functions, same parameter
names `<path>.base.weight`, `<path>.lora_a`, `<path>.lora_b`, same initialisation from the same
numpy seed); the formulas and choices are documented there.

The site walk, option checks and A initialisation are numpy-only and repeated here verbatim,
because this module may not import the MLX one (each engine imports only its own framework);
`tests/test_lora.py` holds the two copies to identical results.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mlx_clip.errors import ConfigError

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
ALL_TOWERS = ("text_model", "vision_model")
# Which submodule of an encoder layer holds each target Linear (the HF module tree).
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "out_proj": "self_attn",
           "fc1": "mlp", "fc2": "mlp"}


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
    check_lora_options(rank=rank, alpha=alpha, targets=targets, towers=towers, dropout=dropout, seed=seed)
    sites = list(_sites(model, towers, targets))
    # Checked before any change, so a refused call leaves the model as it was.
    for _, path, parent, name in sites:
        if isinstance(getattr(parent, name), LoRALinear):
            raise ConfigError(f"LoRA is already applied at {path}; merge_lora first or apply it once")
    for index, path, parent, name in sites:
        base = getattr(parent, name)
        init = init_lora_a(seed, index, rank, base.weight.shape[1])
        setattr(parent, name, LoRALinear(base, init, alpha, dropout))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for _, lora in lora_modules(model):
        lora.lora_a.requires_grad_(True)
        lora.lora_b.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: nn.Module) -> None:
    """Replace every `LoRALinear` by its base Linear holding W + (alpha / rank) B A (bias as it
    was), so `save_pretrained` writes the plain Hugging Face names and shapes."""
    for _, path, parent, name in list(_sites(model, ALL_TOWERS, ALL_TARGETS)):
        lora = getattr(parent, name)
        if isinstance(lora, LoRALinear):
            merged = lora.merged_weight()
            with torch.no_grad():
                lora.base.weight.copy_(merged)
            setattr(parent, name, lora.base)


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(path, module) of every adapted Linear, in the canonical site order."""
    for _, path, parent, name in _sites(model, ALL_TOWERS, ALL_TARGETS):
        module = getattr(parent, name)
        if isinstance(module, LoRALinear):
            yield path, module


def lora_parameter_names(model: nn.Module) -> list[str]:
    """`<path>.lora_a`, `<path>.lora_b` of every adapted Linear, in the canonical site order."""
    return [f"{path}.{key}" for path, _ in lora_modules(model) for key in ("lora_a", "lora_b")]


def init_lora_a(seed: int, index: int, rank: int, in_features: int) -> np.ndarray:
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) as float32 (rank, in), the same bytes in both engines."""
    bound = 1.0 / math.sqrt(in_features)
    rng = np.random.default_rng([seed, index])
    return rng.uniform(-bound, bound, size=(rank, in_features)).astype(np.float32)


def check_lora_options(*, rank, alpha, targets, towers, dropout, seed) -> None:
    if isinstance(rank, bool) or not isinstance(rank, Integral) or rank < 1:
        raise ConfigError(f"lora rank must be an integer >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"lora alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, Real) or not 0.0 <= dropout < 1.0:
        raise ConfigError(f"lora dropout must be in [0, 1), got {dropout!r}")
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise ConfigError(f"lora seed must be an integer >= 0, got {seed!r}")
    _check_names("targets", targets, ALL_TARGETS)
    _check_names("towers", towers, ALL_TOWERS)


def _check_names(field: str, names: Sequence[str], valid: Sequence[str]) -> None:
    if isinstance(names, str) or not names:
        raise ConfigError(f"lora {field} must be a non-empty list of names from {', '.join(valid)}; "
                          f"got {names!r}")
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ConfigError(f"lora {field}: unknown name(s) {', '.join(map(repr, unknown))}; "
                          f"valid: {', '.join(valid)}")


def _sites(model, towers: Sequence[str], targets: Sequence[str]) -> Iterator[tuple[int, str, object, str]]:
    """(index, path, parent module, attribute) of each selected site; `index` counts every possible
    site of the model in canonical order, selected or not (it seeds that site's A)."""
    index = 0
    for tower in ALL_TOWERS:
        for layer_number, layer in enumerate(getattr(model, tower).encoder.layers):
            for target in ALL_TARGETS:
                if tower in towers and target in targets:
                    parent = _PARENT[target]
                    path = f"{tower}.encoder.layers.{layer_number}.{parent}.{target}"
                    yield index, path, getattr(layer, parent), target
                index += 1
