"""A checkpoint resumes only into the run it came from; anything else is one error naming the
difference (before, MLX raised a ValueError, torch a RuntimeError, and MLX silently loaded
same-named tensors of another shape). Run folders are never mixed or silently overwritten."""

from __future__ import annotations

import json
import os

import pytest

from mlx_clip.engine.base import STATE_FILE as ENGINE_STATE_FILE
from mlx_clip.training.run_folder import RunFolder
from mlx_clip.errors import CheckpointError, ConfigError
from mlx_clip.training.trainer import Interrupted
from tests.train_helpers import run, small_config

ENGINES = ["mlx", "torch"]


def _interrupted_run(out, engine, **overrides):
    cfg = small_config(out, engine, steps=6, save_every=2, **overrides)
    with pytest.raises(Interrupted):
        run(cfg, stop_after=2)
    return RunFolder(out).latest()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("change, message", [
    ({"strategy": "lora"}, "strategy: checkpoint 'full', now 'lora'"),
    ({"loss": "siglip"}, "loss: checkpoint 'clip', now 'siglip'"),
    ({"model": "small"}, "is not the architecture the run was started with"),
])
def test_resume_with_other_options_names_the_difference(tmp_path, engine, change, message):
    _interrupted_run(tmp_path / "run", engine, model="tiny")
    with pytest.raises(CheckpointError, match="--resume .*" + message.replace("(", r"\(").replace(")", r"\)")):
        run(small_config(tmp_path / "run", engine, steps=6, save_every=2, resume="latest",
                         **{"model": "tiny", **change}))


@pytest.mark.parametrize("engine", ENGINES)
def test_lora_rank_and_targets_are_checked(tmp_path, engine):
    _interrupted_run(tmp_path / "run", engine, strategy="lora", lora_rank=4)
    for change, message in (({"lora_rank": 8}, "lora_rank: checkpoint 4, now 8"),
                            ({"lora_targets": "q_proj"}, "lora_targets: checkpoint")):
        with pytest.raises(CheckpointError, match=message):
            run(small_config(tmp_path / "run", engine, resume="latest", strategy="lora",
                             **{"lora_rank": 4, **change}))


@pytest.mark.parametrize("engine", ENGINES)
def test_tensor_shapes_are_checked_even_without_the_recorded_options(tmp_path, engine):
    """A checkpoint whose trainer.json lacks the option record (an older one) still cannot load
    tensors of another shape: each engine's state file is checked name by name."""
    checkpoint = _interrupted_run(tmp_path / "run", engine)
    state_path = checkpoint / "trainer.json"
    state = json.loads(state_path.read_text())
    state.pop("config"), state.pop("model_config")
    state_path.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=rf"{ENGINE_STATE_FILE}: does not fit this model \(.*checkpoint \("):
        run(small_config(tmp_path / "run", engine, resume="latest", model="small"))


@pytest.mark.parametrize("engine", ENGINES)
def test_missing_or_corrupt_engine_state_is_named(tmp_path, engine):
    checkpoint = _interrupted_run(tmp_path / "run", engine)
    state = checkpoint / ENGINE_STATE_FILE
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{ENGINE_STATE_FILE}: .*truncated"):
        run(small_config(tmp_path / "run", engine, resume="latest"))
    state.unlink()
    with pytest.raises(CheckpointError, match=rf"{ENGINE_STATE_FILE}: file not found"):
        run(small_config(tmp_path / "run", engine, resume="latest"))


def test_a_used_run_folder_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "run"
    run(small_config(out, "mlx", steps=2, save_every=0))
    with pytest.raises(ConfigError, match=r"already holds a run \(metrics.jsonl, checkpoints, final, config.json\)"):
        run(small_config(out, "mlx", steps=2, save_every=0, overwrite=False))
    before = (out / "metrics.jsonl").read_text()
    run(small_config(out, "mlx", steps=3, save_every=0, overwrite=True))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert before != (out / "metrics.jsonl").read_text()
    assert sorted(r["step"] for r in records if "loss" in r) == [1, 2, 3]  # nothing left of the first run


def test_checkpoint_rename_is_made_durable(tmp_path, monkeypatch):
    """The checkpoints folder itself is fsynced after the rename that commits a checkpoint."""
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    folder = RunFolder(tmp_path / "run")
    final = folder.save(3, lambda d: (d / ENGINE_STATE_FILE).write_bytes(b"x"), {"loader": {}}, keep=2)
    rename_seen = synced.index(str(folder.checkpoints))
    # The files are synced in the temporary folder first, then the folder holding the rename.
    assert any(p.endswith(f"/{ENGINE_STATE_FILE}") and "/.tmp-" in p for p in synced[:rename_seen])
    assert final.is_dir()
