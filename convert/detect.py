"""Which kind of CLIP checkpoint a folder holds, from its file names and safetensors metadata.

- mlx:       config.json + model.safetensors whose metadata says {"format": "mlx"}
- hf:        config.json + model.safetensors (any other format, transformers writes "pt"),
             or model.safetensors.index.json (shards), or pytorch_model.bin(.index.json)
- open_clip: open_clip_config.json + open_clip_model.safetensors (or open_clip_pytorch_model.bin)

A hub repository with both Hugging Face and open_clip files reads as hf: those names are canonical.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlx_clip.convert.safetensors_io import read_metadata
from mlx_clip.errors import CheckpointError

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
HF_WEIGHTS = (SAFETENSORS, SAFETENSORS_INDEX, PICKLE, PICKLE_INDEX)
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_SAFETENSORS = "open_clip_model.safetensors"
OPEN_CLIP_PICKLE = "open_clip_pytorch_model.bin"
OPEN_CLIP_WEIGHTS = (OPEN_CLIP_SAFETENSORS, OPEN_CLIP_PICKLE)
FORMATS = ("mlx", "hf", "open_clip")

EXPECTED = (f"{CONFIG} + {SAFETENSORS} (MLX or Hugging Face), {CONFIG} + {SAFETENSORS_INDEX} or {PICKLE} "
            f"(Hugging Face), or {OPEN_CLIP_CONFIG} + {OPEN_CLIP_SAFETENSORS} (open_clip)")


def weights_file(folder: Path, names: tuple[str, ...]) -> Path | None:
    """The first of `names` present in `folder` (so safetensors wins over pickle)."""
    return next((folder / n for n in names if (folder / n).exists()), None)


def shard_files(index: Path) -> list[Path]:
    """The shard files an index.json's weight_map names, in first-use order."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = list(dict.fromkeys(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{index}: not a valid shard index (expected a 'weight_map' object: {err})") from None
    if not files:
        raise CheckpointError(f"{index}: the weight_map lists no shard files")
    for name in files:
        if not isinstance(name, str) or Path(name).name != name:
            raise CheckpointError(f"{index}: shard {name!r} must be a file name in the same folder")
        if not (index.parent / name).is_file():
            raise CheckpointError(f"{index.parent / name}: file not found (listed in {index.name})")
    return [index.parent / name for name in files]


def detect_format(folder: str | Path) -> str:
    """'mlx' | 'hf' | 'open_clip'; CheckpointError saying what was expected otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise CheckpointError(f"{folder}: {what}; expected a checkpoint folder with {EXPECTED}")
    has_config = (folder / CONFIG).is_file()
    has_open_clip = (folder / OPEN_CLIP_CONFIG).is_file()
    hf_weights = weights_file(folder, HF_WEIGHTS)
    if has_config and hf_weights is not None:
        first = shard_files(hf_weights)[0] if hf_weights.name == SAFETENSORS_INDEX else hf_weights
        if first.suffix == ".safetensors" and read_metadata(first).get("format") == "mlx":
            return "mlx"
        return "hf"
    if has_open_clip and weights_file(folder, OPEN_CLIP_WEIGHTS) is not None:
        return "open_clip"
    if has_open_clip:
        raise CheckpointError(f"{folder / OPEN_CLIP_SAFETENSORS}: file not found (the folder has "
                              f"{OPEN_CLIP_CONFIG}; open_clip weights are {' or '.join(OPEN_CLIP_WEIGHTS)})")
    if has_config:
        raise CheckpointError(f"{folder / SAFETENSORS}: file not found (the folder has {CONFIG}; "
                              f"weights are expected in {', '.join(HF_WEIGHTS)})")
    found = sorted(p.name for p in folder.iterdir())
    listing = ", ".join(found[:8]) + (f", ... ({len(found)} files)" if len(found) > 8 else "") or "nothing"
    raise CheckpointError(f"{folder}: not a CLIP checkpoint folder; expected {EXPECTED}; found {listing}")
