"""The training loop with a fake engine: policy that is the trainer's alone (schedule, NaN guard,
checkpoint cadence), tested in milliseconds and without either framework."""

import json
import subprocess
import sys

import numpy as np
import pytest

from mlx_clip.training.run_folder import RunFolder
from mlx_clip.engine.policy import decays, training_plan
from mlx_clip.training.schedule import lr_at
from mlx_clip.training.options import TrainConfig
from mlx_clip.training.trainer import Trainer, TrainingStopped


class FakeLoader:
    def __init__(self):
        self.position = 0

    def next_batch(self):
        self.position += 1
        return type("Batch", (), {"indices": np.arange(4)})()

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


class FakeEngine:
    """The Backend protocol around one scalar weight: lr is added on every finite step."""

    name = "fake"
    phase = "full"

    def __init__(self, losses, cfg):
        from mlx_clip.model.config import CLIPConfig

        self.config = CLIPConfig()
        self.plan = training_plan(cfg)  # what EngineBase.prepare_training decides
        self.losses = list(losses)
        self.weights = 0.0
        self.lrs = []

    def state_shapes(self):
        return {"model/weights": ()}

    def train_step(self, batch, lr):
        loss = self.losses.pop(0)
        ok = np.isfinite(loss)
        if ok:
            self.weights += lr
        self.lrs.append(lr)
        return {"loss": loss, "grad_norm": 1.0 if ok else float("nan"), "ok": bool(ok), "logit_scale": 100.0}

    def save_state(self, folder):
        from safetensors.numpy import save_file

        save_file({"model/weights": np.asarray(self.weights, np.float64)}, str(folder / "engine_state.safetensors"))

    def load_state(self, folder):
        from safetensors.numpy import load_file

        self.weights = float(load_file(str(folder / "engine_state.safetensors"))["model/weights"])

    def save(self, folder, to=None):
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def memory(self):
        return {}


def make(tmp_path, losses, **overrides):
    cfg = TrainConfig(**{"lr": 1.0, "warmup_steps": 2, "log_every": 1, "save_every": 3, **overrides})
    engine = FakeEngine(losses, cfg)
    return Trainer(cfg, engine, FakeLoader(), RunFolder(tmp_path), len(losses), progress=False), engine


@pytest.mark.parametrize("total, warmup", [(10, 2), (1000, 40), (7, 0), (50, 49)])
def test_schedule_equals_open_clip_cosine_lr(total, warmup):
    """open_clip_train.scheduler.cosine_lr (the reference our schedule follows), step by step."""
    import torch
    from open_clip_train.scheduler import cosine_lr

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    reference = cosine_lr(optimizer, 3e-4, warmup, total)
    for step in range(total):
        assert lr_at(step, total, 3e-4, warmup) == pytest.approx(reference(step), rel=1e-12, abs=1e-18), step


def test_schedule_floor_scales_the_cosine_between_floor_and_peak():
    # open_clip has no floor; with min_ratio r the cosine part is r*peak + (1-r) * open_clip's.
    plain = [lr_at(s, 10, 1.0, 2) for s in range(10)]
    floored = [lr_at(s, 10, 1.0, 2, min_ratio=0.1) for s in range(10)]
    for step in range(2, 10):
        assert floored[step] == pytest.approx(0.1 + 0.9 * plain[step])


def test_weight_decay_groups_follow_open_clip():
    assert decays("clip.text_model.encoder.layers.0.mlp.fc1.weight", 2)
    for name, ndim in [("clip.text_model.encoder.layers.0.mlp.fc1.bias", 1),
                       ("clip.vision_model.pre_layrnorm.weight", 1),
                       ("clip.text_model.embeddings.token_embedding.weight", 2),
                       ("clip.vision_model.embeddings.position_embedding.weight", 2),
                       ("clip.logit_scale", 0), ("logit_bias", 0)]:
        assert not decays(name, ndim), name


def test_nan_steps_are_skipped_counted_and_logged(tmp_path):
    trainer, engine = make(tmp_path, [1.0, float("nan"), 0.5, float("inf"), 0.4])
    result = trainer.fit()
    assert result.nan_steps == 2
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["loss"] for line in lines][1] == "nan" and [line["skipped"] for line in lines] == [
        False, True, False, True, False]
    assert engine.weights == pytest.approx(sum(lr for lr, loss in zip(engine.lrs, [1, np.nan, 1, np.inf, 1])
                                               if np.isfinite(loss)))


def test_consecutive_nans_stop_the_run_keeping_the_last_good_checkpoint(tmp_path):
    trainer, _ = make(tmp_path, [1.0, 1.0, 1.0, 1.0] + [float("nan")] * 3 + [1.0], max_nan_steps=3)
    with pytest.raises(TrainingStopped, match="3 non-finite steps in a row at step 7.*step-0000003"):
        trainer.fit()
    assert RunFolder(tmp_path).latest().name == "step-0000003"


def test_trainer_imports_neither_framework():
    code = ("import sys, mlx_clip.training.trainer, mlx_clip.finetune, mlx_clip.training.run_folder; "
            "print(sorted(m for m in ('mlx', 'mlx.core', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_forgetting_budget_stops_early_and_keeps_the_model(tmp_path):
    cfg = TrainConfig(lr=1.0, warmup_steps=0, log_every=1, save_every=0, eval_every=2, max_control_drop=0.1)
    engine = FakeEngine([1.0] * 10, cfg)
    controls = iter([0.78, 0.62, 0.5])  # drops 0.02, then 0.18 > 0.1
    trainer = Trainer(cfg, engine, FakeLoader(), RunFolder(tmp_path), 10, progress=False,
                      evaluate=lambda _: {"control_zero_shot_top1": next(controls)})
    trainer.baseline = {"control_zero_shot_top1": 0.8}
    result = trainer.fit()
    assert trainer.stopped_early and result.steps == 4
    assert result.final_model is not None and RunFolder(tmp_path).latest().name == "step-0000004"
