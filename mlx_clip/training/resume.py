"""Whether a checkpoint may continue into this run: the same engine and number of processes, the
same options where they decide the update, the same data, the same architecture and tensor
shapes — each difference named before any tensor is loaded."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from mlx_clip.convert.safetensors_io import read_header
from mlx_clip.data.fingerprint import differences
from mlx_clip.engine.base import MODEL, STATE_FILE
from mlx_clip.engine.distributed import World
from mlx_clip.engine.protocol import Backend
from mlx_clip.errors import CheckpointError, MlxClipError
from mlx_clip.training.options import TrainConfig

# Options a resumed run may change: they decide how long it runs, what it logs, saves and
# evaluates, where and how fast a step runs — never which samples a step sees or the update it
# makes. Every other option must equal the checkpoint's (an option added later is frozen unless
# named here). --model may name the same architecture elsewhere (checked tensor by tensor; the
# checkpoint holds every weight); the data are compared by their fingerprint, not by path.
RESUME_FREE = frozenset({
    "steps", "epochs", "log_every", "save_every", "keep_checkpoints", "evaluate", "eval_every", "max_control_drop",
    "max_nan_steps", "tensorboard", "keep_best", "control_data", "num_workers", "max_bad_fraction",
    "gradient_checkpointing", "compile", "memory_budget", "device", "allow_pickle", "resume", "overwrite", "out", "model",
    "data", "val_data", "image_column", "caption_column"})


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def check_resumable(checkpoint, state: dict, cfg: TrainConfig, engine: Backend, data_fingerprint: dict | None = None,
                    *, world: World = World(), total_steps: int | None = None) -> None:
    """Name what differs between a checkpoint and the run resuming it, before any tensor is
    loaded: the engine, the number of processes, the length, training options, the data, the
    model's architecture, then each saved tensor's name and shape."""
    if state.get("backend") != engine.name:
        raise MlxClipError(f"{checkpoint} was written by the {state.get('backend')} engine; "
                           f"resume it with --backend {state.get('backend')}")
    saved_world = int(state.get("world_size", 1))
    if saved_world != world.size:
        raise CheckpointError(f"--resume {checkpoint}: the run was trained by {saved_world} process(es), this one "
                              f"has {world.size}; resume with {saved_world} (the batch's split and the "
                              "summation order follow the world size)")
    if total_steps is not None and int(state["step"]) > total_steps:
        raise CheckpointError(f"--resume {checkpoint}: the run is at step {state['step']}, beyond this run's "
                              f"{total_steps} steps; give --steps {state['step']} or more")
    saved_cfg = state.get("config") or {}
    if saved_cfg:
        from mlx_clip.engine.policy import default_loss

        saved = TrainConfig(**{k: v for k, v in saved_cfg.items() if k in TrainConfig.field_names()})

        def effective(c: TrainConfig, key: str):
            value = getattr(c, key)
            return (value or default_loss(engine.config)) if key == "loss" else value

        frozen = [key for key in TrainConfig.field_names() if key not in RESUME_FREE]
        changed = [f"{key}: checkpoint {effective(saved, key)!r}, now {effective(cfg, key)!r}"
                   for key in frozen if effective(saved, key) != effective(cfg, key)]
        if changed:
            raise CheckpointError(f"--resume {checkpoint}: the run was started with other options ("
                                  f"{'; '.join(changed)}); resume with the same ones or start a new --out")
    if data_fingerprint is not None and state.get("data") is not None:
        changed = differences(state["data"], data_fingerprint)
        if changed:
            raise CheckpointError(f"--resume {checkpoint}: the data are not the ones the run was trained on "
                                  f"({'; '.join(changed)}); resume with the same data or start a new --out")
    if "model_config" in state:
        before, now = _flat(state["model_config"]), _flat(dataclasses.asdict(engine.config))
        changed = [f"{k}: checkpoint {before.get(k)!r}, now {now.get(k)!r}"
                   for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
        if changed:
            raise CheckpointError(f"--resume {checkpoint}: --model {cfg.model} is not the architecture the run "
                                  f"was started with ({'; '.join(changed[:4])})")
    entries, _, _ = read_header(Path(checkpoint) / STATE_FILE)
    stored = {name: entry.shape for name, entry in entries.items() if name.startswith(MODEL)}
    expected = engine.state_shapes()
    problems = [f"{n} missing" for n in sorted(set(expected) - set(stored))][:3]
    problems += [f"{n} not in this model" for n in sorted(set(stored) - set(expected))][:3]
    problems += [f"{n}: checkpoint {stored[n]}, now {expected[n]}" for n in sorted(set(stored) & set(expected))
                 if tuple(stored[n]) != tuple(expected[n])][:3]
    if problems:
        raise CheckpointError(f"{Path(checkpoint) / STATE_FILE}: does not fit this model ({'; '.join(problems)})")
