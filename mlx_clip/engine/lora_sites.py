"""Where LoRA goes and how it starts, shared by both engines: numpy only, no framework import.

`mlx_clip/mlx_backend/lora.py` and `torch_backend/lora.py` each define a `LoRALinear` for their
framework and hand that class to `wrap_sites`; the functions here need of a model only the Hugging
Face module tree (`<tower>.encoder.layers[i].<self_attn|mlp>.<target>`), of a Linear only
`weight.shape`, and of an adapter only its `base`, `lora_a` and `lora_b`. Keeping the walk, the
option checks, the A initialisation and the merged copy in one place is what makes the two engines
agree on parameter names, site order and initial bytes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from numbers import Real
from typing import Iterator, Sequence

import numpy as np

from mlx_clip.errors import ConfigError, check_int

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
ALL_TOWERS = ("text_model", "vision_model")
# Which submodule of an encoder layer holds each target Linear (the HF module tree).
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "out_proj": "self_attn",
           "fc1": "mlp", "fc2": "mlp"}


def wrap_sites(model, lora_class: type, *, rank: int, alpha: float, targets: Sequence[str],
               towers: Sequence[str], dropout: float, seed: int) -> None:
    """Check the options, then replace each selected Linear `base` of `model` by
    `lora_class(base, init_lora_a(...), alpha, dropout)`, in place. Freezing is the engine's job."""
    check_lora_options(rank=rank, alpha=alpha, targets=targets, towers=towers, dropout=dropout, seed=seed)
    sites = list(lora_sites(model, towers, targets))
    # Checked before any change, so a refused call leaves the model as it was.
    for _, path, parent, name in sites:
        if is_adapted(getattr(parent, name)):
            raise ConfigError(f"LoRA is already applied at {path}; merge_lora first or apply it once")
    for index, path, parent, name in sites:
        base = getattr(parent, name)
        init = init_lora_a(seed, index, rank, base.weight.shape[1])
        setattr(parent, name, lora_class(base, init, alpha, dropout))


def is_adapted(module) -> bool:
    """Whether `module` is either engine's `LoRALinear` (a base Linear plus lora_a / lora_b)."""
    return all(hasattr(module, key) for key in ("base", "lora_a", "lora_b"))


def adapted_sites(model) -> Iterator[tuple[str, object, str, object]]:
    """(path, parent module, attribute, adapted module) of every adapted Linear, in the canonical
    site order."""
    for _, path, parent, name in lora_sites(model, ALL_TOWERS, ALL_TARGETS):
        module = getattr(parent, name)
        if is_adapted(module):
            yield path, parent, name, module


def lora_modules(model) -> Iterator[tuple[str, object]]:
    """(path, module) of every adapted Linear, in the canonical site order."""
    for path, _, _, module in adapted_sites(model):
        yield path, module


def merged(model, merge_lora: Callable[[object], None]):
    """`model` itself when it has no adapter, else a deep copy with every adapter folded in by the
    engine's `merge_lora` (so saving never changes the model that is still training)."""
    if next(lora_modules(model), None) is None:
        return model
    model = copy.deepcopy(model)
    merge_lora(model)
    return model


def lora_parameter_names(model) -> list[str]:
    """`<path>.lora_a`, `<path>.lora_b` of every adapted Linear, in the canonical site order."""
    return [f"{path}.{key}" for path, _ in lora_modules(model) for key in ("lora_a", "lora_b")]


def init_lora_a(seed: int, index: int, rank: int, in_features: int) -> np.ndarray:
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) as float32 (rank, in), the same bytes in both engines."""
    bound = 1.0 / math.sqrt(in_features)
    rng = np.random.default_rng([seed, index])
    return rng.uniform(-bound, bound, size=(rank, in_features)).astype(np.float32)


def check_lora_options(*, rank, alpha, targets, towers, dropout, seed) -> None:
    check_int("lora rank", rank, minimum=1)
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"lora alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, Real) or not 0.0 <= dropout < 1.0:
        raise ConfigError(f"lora dropout must be in [0, 1), got {dropout!r}")
    check_int("lora seed", seed, minimum=0)
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


def lora_sites(model, towers: Sequence[str], targets: Sequence[str]) -> Iterator[tuple[int, str, object, str]]:
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
