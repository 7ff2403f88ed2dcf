"""The engine boundary. The trainer, evaluation, the converters' verification, the CLI and the
benchmarks talk to an engine only through this protocol, with numpy arrays: channels-last float32
pixels, int64 token ids. Each engine imports its own framework, lazily, so a machine with only one
of them can still use the toolkit with that engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mlx_clip.model.config import CLIPConfig, check_quantize
from mlx_clip.errors import ConfigError

BACKENDS = ("mlx", "torch")


class Backend(Protocol):
    """One CLIP in one framework: inference always, training after `prepare_training`."""

    name: str
    config: CLIPConfig

    # --- inference ---
    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) normalized float32 -> (B, P) L2-normalised float32."""

    def encode_texts(self, token_ids: np.ndarray) -> np.ndarray:
        """(B, L) int64 -> (B, P) L2-normalised float32."""

    def save(self, folder: str | Path, *, to: str | None = None) -> Path:
        """A plain model folder (LoRA merged; weights, config, tokenizer and preprocessor files)
        in format `to` ("mlx" | "hf" | "open_clip"; default: the engine's own layout), loadable by
        both engines."""

    def memory(self) -> dict[str, int]:
        """Peak / active bytes as the engine sees them."""

    # --- training ---
    def prepare_training(self, cfg: Any) -> None:
        """Apply the `policy.training_plan` of a TrainConfig; build the optimizer and the step."""

    def trainable_count(self) -> int:
        """Parameters the optimizer updates."""

    def parameter_sizes(self, trainable: bool = True) -> dict[str, int]:
        """Name -> element count of the trained module's parameters (only those training now)."""

    def layer_decay_table(self) -> list[dict]:
        """`--layer-decay`'s lr scale per (tower, layer), with its parameter count (`policy.lr_scales`)."""

    def ema_weights(self) -> Any:
        """With `--ema-decay`: a context in which the model holds the moving average of its trained
        weights, the trained ones restored on leaving (how `final-ema/` is written and evaluated)."""

    def train_step(self, batch: Any, lr: float) -> dict:
        """One update on a `data.loader.Batch`: {loss, grad_norm, ok, logit_scale}. A step with
        a non-finite loss or gradient (ok False) changes no weight and no optimizer state."""

    phase: str  # "probe" | "full" (policy.PHASES): what trains now; always "full" but in LP-FT

    def set_phase(self, phase: str) -> None:
        """LP-FT's switch: train what `phase` trains from the next step on, with fresh optimizer
        state. `save_state` records the phase and `load_state` restores it."""

    def save_state(self, folder: Path) -> None:
        """Weights and optimizer state, enough to continue bit for bit."""

    def load_state(self, folder: Path) -> None:
        """Restore what `save_state` wrote."""

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of each `model/` tensor `save_state` writes, for checking a checkpoint
        fits before loading it."""

    # --- several processes (mlx_clip.engine.distributed) ---
    world: Any  # distributed.World: one process until `prepare_training` joins the launcher's group

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any (a collective; one process: `flag`)."""

    def rank_sum(self, values: np.ndarray) -> np.ndarray:
        """The element-wise sum of a small int64 vector over the ranks (a collective; one process: `values`)."""


def engine_class(name: str) -> type:
    """The class of engine `name`, imported on first use."""
    if name == "mlx":
        from mlx_clip.mlx_backend.backend import MLXBackend

        return MLXBackend
    if name == "torch":
        from mlx_clip.torch_backend.backend import TorchBackend

        return TorchBackend
    raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {name!r}")


def load_backend(name: str, folder: str | Path, *, device: str | None = None,
                 dtype: str | None = None, allow_pickle: bool = False, image_size: int | None = None,
                 quantize: int | None = None) -> Backend:
    """The engine `name` ("mlx" | "torch") holding the model in `folder` (any supported format);
    with `image_size`, as a model of that size (`mlx_clip.convert.resolution.at_image_size`); with
    `quantize` (8 or 4), its Linears quantized to that many bits, for inference (MLX only)."""
    check_quantize(quantize)
    return engine_class(name).from_folder(folder, dtype=dtype, allow_pickle=allow_pickle, device=device,
                                          image_size=image_size, quantize=quantize)


def describe_engines() -> list[str]:
    """One line per engine: its framework's version and the device it would pick, or why not."""
    lines = []
    for name in BACKENDS:
        try:
            lines.append(engine_class(name).describe())
        except ImportError as err:
            lines.append(f"{name}: not available ({err})")
    return lines
