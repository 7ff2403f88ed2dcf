"""Read any supported checkpoint folder into Hugging Face names and torch layout, checked against
its config before anything is built.

`read_stored` keeps every tensor's stored bytes (BF16 as bits) for exact conversion;
`read_checkpoint` is what the engines call: the same tensors as numpy values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlx_clip.convert import detect, open_clip_siglip
from mlx_clip.convert.dtypes import to_numpy
from mlx_clip.convert.layout import mlx_to_torch, torch_to_mlx
from mlx_clip.convert.names import open_clip_to_hf, open_clip_shapes, rules
from mlx_clip.convert.open_clip_config import clip_config_from_open_clip, layout_of, read_open_clip_config
from mlx_clip.convert.pickle_weights import read_pickled
from mlx_clip.convert.safetensors_io import Tensor, read_safetensors
from mlx_clip.convert.shapes import EXTRA_TENSORS, Shape, expected_shapes, is_buffer
from mlx_clip.model.config import CLIPConfig, describe_quantization
from mlx_clip.errors import CheckpointError

MAX_LISTED = 5


@dataclass
class StoredCheckpoint:
    """Tensors as stored (HF names, torch layout, original dtypes and bytes)."""

    config: CLIPConfig
    tensors: dict[str, Tensor]
    extra_tensors: dict[str, Tensor]  # kept by converters, unused by the model (open_clip's logit_bias)
    source_format: str
    folder: Path


@dataclass
class Checkpoint:
    """What an engine loads: HF names, torch layout (conv (out, in, kh, kw)), numpy values with
    bf16 widened exactly to float32. `dtypes` gives each tensor's stored dtype (safetensors tag)."""

    config: CLIPConfig
    tensors: dict[str, np.ndarray]
    source_format: str
    folder: Path
    extra_tensors: dict[str, np.ndarray] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)


def read_checkpoint(folder: str | Path, *, allow_pickle: bool = False) -> Checkpoint:
    stored = read_stored(folder, allow_pickle=allow_pickle)
    return Checkpoint(
        config=stored.config,
        tensors={n: _writable(to_numpy(t)) for n, t in stored.tensors.items()},
        source_format=stored.source_format,
        folder=stored.folder,
        extra_tensors={n: _writable(to_numpy(t)) for n, t in stored.extra_tensors.items()},
        dtypes={n: t.dtype for n, t in stored.tensors.items()},
    )


def _writable(array: np.ndarray) -> np.ndarray:
    # Transposed views (MLX patch embedding) become contiguous, so torch.from_numpy takes them as is.
    # (Not np.ascontiguousarray: it turns the 0-d logit_scale into shape (1,).)
    return array if array.flags.c_contiguous and array.flags.writeable else array.copy(order="C")


def read_stored(folder: str | Path, *, allow_pickle: bool = False) -> StoredCheckpoint:
    folder = Path(folder)
    fmt = detect.detect_format(folder)
    if fmt == "open_clip":
        return _read_open_clip(folder, allow_pickle)
    config = CLIPConfig.from_file(folder / detect.CONFIG)
    if config.quantization is not None:
        raise CheckpointError(quantized_refusal(folder, config.quantization,
                                                "training, the torch engine and conversion read float weights"))
    tensors, label = _read_hf_weights(folder, allow_pickle)
    expected = expected_shapes(config)
    if fmt == "mlx":
        expected = {n: _mlx_shape(n, s) for n, s in expected.items()}
    model, extras = _check(tensors, expected, label, folder / detect.CONFIG)
    if fmt == "mlx":
        model = {n: t.with_array(mlx_to_torch(n, t.array)) for n, t in model.items()}
    return StoredCheckpoint(config, model, extras, fmt, folder)


def quantization_of(folder: str | Path) -> dict | None:
    """The "quantization" entry ({"group_size", "bits"}) of an MLX folder written by `convert
    --quantize` (or mlx-lm's layout), None for float weights; read from config.json alone."""
    folder = Path(folder)
    if detect.detect_format(folder) != "mlx":
        return None
    return CLIPConfig.from_file(folder / detect.CONFIG).quantization


def quantized_refusal(folder: Path, quantization: dict, why: str,
                      instead: str = "give the float folder they were quantized from") -> str:
    """The one line for a quantized folder given where float weights are needed: what it holds,
    why it cannot be used here, and what to do instead."""
    return (f"{folder} holds MLX-quantized weights ({describe_quantization(quantization)}), which only the MLX "
            f"engine runs, for inference (embed, eval, index, serve with --backend mlx); {why}: {instead}")


def _mlx_shape(name: str, shape: Shape) -> Shape:
    # A zero-stride view: the transpose's shape without allocating the tensor.
    return torch_to_mlx(name, np.broadcast_to(np.uint8(0), shape)).shape


def _read_open_clip(folder: Path, allow_pickle: bool) -> StoredCheckpoint:
    config_path = folder / detect.OPEN_CLIP_CONFIG
    data = read_open_clip_config(config_path)
    if open_clip_siglip.has_timm_trunk(data["model_cfg"]):
        return _read_open_clip_siglip(folder, data, allow_pickle)
    config = clip_config_from_open_clip(data, str(config_path))
    layout = layout_of(data["model_cfg"])
    table = rules(config.vision_config.num_hidden_layers, config.text_config.num_hidden_layers,
                  text_prefix=layout.text_prefix, logit_scale_shape=layout.logit_scale_shape)
    path, tensors = _read_open_clip_weights(folder, allow_pickle)
    expected = open_clip_shapes(table, expected_shapes(config))
    if layout.has_logit_bias:
        expected["logit_bias"] = layout.logit_scale_shape
    found = {n: t for n, t in tensors.items() if not is_buffer(n)}
    _check_names(found, expected, set(), str(path), config_path)
    extras = {n: found[n] for n in EXTRA_TENSORS if n in found}
    return StoredCheckpoint(config, open_clip_to_hf(found, table), extras, "open_clip", folder)


def _read_open_clip_siglip(folder: Path, data: dict, allow_pickle: bool) -> StoredCheckpoint:
    """open_clip's SigLIP (timm trunk + open_clip text tower): logit_bias is a model tensor."""
    config_path = folder / detect.OPEN_CLIP_CONFIG
    config = open_clip_siglip.siglip_config_from_open_clip(data, str(config_path))
    layout = layout_of(data["model_cfg"])
    table = open_clip_siglip.rules(config.vision_config.num_hidden_layers, config.text_config.num_hidden_layers,
                                   text_prefix=layout.text_prefix, logit_scale_shape=layout.logit_scale_shape)
    path, tensors = _read_open_clip_weights(folder, allow_pickle)
    found = {n: t for n, t in tensors.items() if not is_buffer(n)}
    _check_names(found, open_clip_siglip.open_clip_shapes(table, expected_shapes(config)), set(), str(path),
                 config_path)
    return StoredCheckpoint(config, open_clip_siglip.open_clip_to_hf(found, table), {}, "open_clip", folder)


def _read_open_clip_weights(folder: Path, allow_pickle: bool) -> tuple[Path, dict[str, Tensor]]:
    path = detect.weights_file(folder, detect.OPEN_CLIP_WEIGHTS)
    if path.suffix == ".safetensors":
        return path, read_safetensors(path)[0]
    return path, read_pickled(path, allow_pickle=allow_pickle)


def _read_hf_weights(folder: Path, allow_pickle: bool) -> tuple[dict[str, Tensor], str]:
    """All tensors of the folder's HF/MLX weights, and the file name to cite in errors."""
    path = detect.weights_file(folder, detect.HF_WEIGHTS)
    if path.name == detect.SAFETENSORS:
        return read_safetensors(path)[0], str(path)
    if path.name == detect.PICKLE:
        return read_pickled(path, allow_pickle=allow_pickle), str(path)
    tensors: dict[str, Tensor] = {}
    for shard in detect.shard_files(path):
        if shard.suffix == ".safetensors":
            tensors.update(read_safetensors(shard)[0])
        else:
            tensors.update(read_pickled(shard, allow_pickle=allow_pickle))
    return tensors, str(path)


def _check(tensors: dict[str, Tensor], expected: dict[str, Shape], label: str,
           config_path: Path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    found = {n: t for n, t in tensors.items() if not is_buffer(n)}
    _check_names(found, expected, set(EXTRA_TENSORS), label, config_path)
    model = {n: found[n] for n in expected}
    # SigLIP's own logit_bias is a model tensor, not an extra.
    extras = {n: found[n] for n in EXTRA_TENSORS if n in found and n not in expected}
    for name, tensor in extras.items():
        if tensor.array.size != 1:
            raise CheckpointError(f"{label}: tensor {name} has shape {tensor.shape}, expected a single value")
    return model, extras


def _listed(names: set[str]) -> str:
    shown = sorted(names)[:MAX_LISTED]
    more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return ", ".join(shown) + more


def _check_names(found: dict[str, Tensor], expected: dict[str, Shape], optional: set[str], label: str,
                 config_path: Path) -> None:
    missing = set(expected) - set(found)
    if missing:
        raise CheckpointError(f"{label}: {len(missing)} tensors that {config_path.name} implies are missing: "
                              f"{_listed(missing)}")
    unexpected = set(found) - set(expected) - optional
    if unexpected:
        raise CheckpointError(f"{label}: {len(unexpected)} tensors that {config_path.name} does not describe: "
                              f"{_listed(unexpected)}")
    for name, shape in expected.items():
        if found[name].shape != tuple(shape):
            raise CheckpointError(f"{label}: tensor {name} has shape {found[name].shape}, expected "
                                  f"{tuple(shape)} from {config_path}")
