"""The engine boundary. The trainer, evaluation and server talk to an engine only through this
protocol, with numpy arrays: channels-last float32 pixels, int64 token ids. Each engine imports
its own framework, lazily, so a machine with only one of them can still use the toolkit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mlx_clip.config import CLIPConfig
from mlx_clip.errors import ConfigError

BACKENDS = ("mlx", "torch")


class Backend(Protocol):
    name: str
    config: CLIPConfig

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) normalized float32 -> (B, P) L2-normalised float32."""

    def encode_texts(self, token_ids: np.ndarray) -> np.ndarray:
        """(B, L) int64 -> (B, P) L2-normalised float32."""

    def save(self, folder: str | Path) -> None:
        """config.json + model.safetensors in this engine's native layout."""

    def memory(self) -> dict[str, int]:
        """Peak / active bytes as the engine sees them."""


def load_backend(name: str, folder: str | Path, *, device: str | None = None,
                 dtype: str | None = None, allow_pickle: bool = False, **kwargs: Any) -> Backend:
    if name == "mlx":
        if device not in (None, "cpu", "gpu", "auto"):
            raise ConfigError(f"--device {device!r} is not an MLX device (use cpu or gpu)")
        from mlx_clip.mlx_backend import MLXBackend

        return MLXBackend.from_folder(folder, dtype=dtype, allow_pickle=allow_pickle, device=device, **kwargs)
    if name == "torch":
        from torch_backend.backend import TorchBackend

        return TorchBackend.from_folder(folder, dtype=dtype, allow_pickle=allow_pickle, device=device, **kwargs)
    raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {name!r}")
