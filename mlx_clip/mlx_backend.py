"""The MLX engine: loads any supported checkpoint folder into `mlx_clip.model.CLIPModel`,
encodes numpy batches, saves in MLX layout."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from convert.layout import mlx_to_torch, torch_to_mlx
from mlx_clip.config import CLIPConfig
from mlx_clip.errors import ConfigError
from mlx_clip.model import CLIPModel, init_weights, normalize

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
MLX_FORMAT = "mlx"


def mlx_dtype(name: str | None):
    if name is None:
        return mx.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}") from None


def select_device(requested: str | None) -> str:
    """MLX on a Mac uses the GPU through Metal; its Linux CPU build has only the CPU."""
    if requested in (None, "auto"):
        return "gpu" if mx.metal.is_available() else "cpu"
    if requested == "gpu" and not mx.metal.is_available():
        raise ConfigError("--device gpu: this MLX build has no GPU (Metal is not available)")
    return requested


def load_mlx_model(folder: str | Path, *, dtype: str | None = None, allow_pickle: bool = False) -> CLIPModel:
    from convert import read_checkpoint

    checkpoint = read_checkpoint(folder, allow_pickle=allow_pickle)
    model = CLIPModel(checkpoint.config)
    weights = [(name, mx.array(torch_to_mlx(name, array))) for name, array in checkpoint.tensors.items()]
    model.load_weights(weights, strict=True)
    if dtype is not None and dtype != "float32":
        model.set_dtype(mlx_dtype(dtype))
    mx.eval(model.parameters())
    return model


def save_mlx_model(model: CLIPModel, folder: str | Path, metadata: dict[str, str] | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save(folder)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), weights,
                        metadata={"format": MLX_FORMAT, **(metadata or {})})
    return folder


def torch_layout_numpy(model: CLIPModel) -> dict[str, np.ndarray]:
    """Parameters as numpy in torch layout (float32), for engines and converters that need it."""
    return {name: mlx_to_torch(name, np.array(value.astype(mx.float32)))
            for name, value in tree_flatten(model.parameters())}


class MLXBackend:
    name = "mlx"

    def __init__(self, model: CLIPModel, device: str | None = None):
        mx.set_default_device(mx.gpu if select_device(device) == "gpu" else mx.cpu)
        self.model = model
        self.config: CLIPConfig = model.config
        self.model.eval()

    @classmethod
    def from_folder(cls, folder, *, dtype=None, allow_pickle=False, device=None) -> "MLXBackend":
        return cls(load_mlx_model(folder, dtype=dtype, allow_pickle=allow_pickle), device=device)

    @classmethod
    def random(cls, config: CLIPConfig, seed: int = 0) -> "MLXBackend":
        model = CLIPModel(config)
        init_weights(model, seed)
        return cls(model)

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        features = self.model.get_image_features(mx.array(pixels))
        out = normalize(features.astype(mx.float32))
        return np.array(out)

    def encode_texts(self, token_ids: np.ndarray) -> np.ndarray:
        features = self.model.get_text_features(mx.array(np.asarray(token_ids, dtype=np.int32)))
        return np.array(normalize(features.astype(mx.float32)))

    def logit_scale(self) -> float:
        return float(mx.exp(self.model.logit_scale))

    def save(self, folder: str | Path) -> Path:
        return save_mlx_model(self.model, folder)

    def state_numpy(self) -> dict[str, np.ndarray]:
        return torch_layout_numpy(self.model)

    def memory(self) -> dict[str, int]:
        return {"peak_bytes": int(mx.get_peak_memory()), "active_bytes": int(mx.get_active_memory()),
                "cache_bytes": int(mx.get_cache_memory())}

