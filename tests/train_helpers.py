"""Small fine-tuning runs on the built-in demo domain, shared by the trainer tests."""

from __future__ import annotations

import numpy as np
from safetensors.numpy import load_file

from mlx_clip.finetune import demo_preset, finetune
from mlx_clip.training.options import TrainConfig


def small_config(out, backend: str, **overrides) -> TrainConfig:
    flags = {"backend": backend, "model": "tiny", "steps": 10, "batch_size": 8, "warmup_steps": 2, "out": str(out),
             "save_every": 4, "log_every": 1, "num_workers": 1, **overrides}
    return TrainConfig.resolve(None, flags, preset=demo_preset())


def run(cfg: TrainConfig, **kwargs):
    return finetune(cfg, progress=kwargs.pop("progress", False), evaluate=kwargs.pop("evaluate", False),
                    echo=lambda *a: None, **kwargs)


def final_weights(out) -> dict[str, np.ndarray]:
    return load_file(f"{out}/final/model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name


def assert_resume_is_exact(config, root, stop_after: int = 4) -> None:
    """`config(out, **extra)` -> a TrainConfig: the run cut after `stop_after` steps and resumed
    logs the uninterrupted run's later losses and ends with its final weights, bit for bit."""
    import pytest

    from mlx_clip.training.trainer import Interrupted

    full = run(config(root / "full"))
    with pytest.raises(Interrupted):
        run(config(root / "cut"), stop_after=stop_after)
    resumed = run(config(root / "cut", resume="latest"))
    assert resumed.train.losses == full.train.losses[stop_after:]
    assert_same_weights(final_weights(root / "cut"), final_weights(root / "full"))
