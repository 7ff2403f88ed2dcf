"""LoRA for the MLX engine: low-rank adapters on the attention and MLP Linears of either tower.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models": a frozen Linear W gains a
trainable update, y = W x + b + (alpha / rank) * B (A dropout(x)), with A (rank, in) and B (out, rank).

`torch_backend/lora.py` is the twin for the torch engine: same functions, same parameter names,
same initialisation from the same numpy seed, so both engines start a run from equal weights.

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
from numbers import Integral, Real
from typing import Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_clip.errors import ConfigError

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
ALL_TOWERS = ("text_model", "vision_model")
# Which submodule of an encoder layer holds each target Linear (the HF module tree).
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "out_proj": "self_attn",
           "fc1": "mlp", "fc2": "mlp"}


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
    """Wrap each targeted Linear of `model` (an `mlx_clip.model.CLIPModel`) in a `LoRALinear`, in
    place, and freeze everything but the LoRA tensors. Returns the number of trainable parameters.

    The caller may unfreeze more afterwards, e.g. `model.unfreeze(keys=["logit_scale"], recurse=False)`.
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
    model.freeze()
    for _, lora in lora_modules(model):
        lora.unfreeze(keys=["lora_a", "lora_b"], recurse=False)
    return sum(int(math.prod(p.shape)) for _, p in tree_flatten(model.trainable_parameters()))


def merge_lora(model: nn.Module) -> None:
    """Replace every `LoRALinear` by its base Linear holding W + (alpha / rank) B A (bias as it
    was), so the model has the plain Hugging Face names and shapes again."""
    for _, path, parent, name in list(_sites(model, ALL_TOWERS, ALL_TARGETS)):
        lora = getattr(parent, name)
        if isinstance(lora, LoRALinear):
            # The base module keeps its frozen flags: merging changes values, not what trains.
            lora.base.weight = lora.merged_weight()
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

