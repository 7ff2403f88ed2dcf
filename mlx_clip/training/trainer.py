"""The one training loop. It imports neither framework: an engine (`mlx_clip.engine.protocol.Backend`,
after `prepare_training`) does the step on numpy batches, and everything else — data order,
schedule, clipping policy, NaN guard, evaluation, checkpoints, logging, interruption — is decided
here, the same for both engines."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_clip.engine.distributed import World
from mlx_clip.engine.protocol import Backend
from mlx_clip.errors import ConfigError
from mlx_clip.training.held_out import CONTROL_TOP1
from mlx_clip.training.interruption import Interrupted, StopSignals, TrainingStopped, stopped_at_once
from mlx_clip.training.keep_best import KeepBest
from mlx_clip.training.monitor import MetricsLog, Progress, RunLog, SilentLog
from mlx_clip.training.options import TrainConfig
from mlx_clip.training.resume import check_resumable
from mlx_clip.training.run_folder import RunFolder, read_trainer_state
from mlx_clip.training.schedule import effective_warmup, parse_resolution_schedule, phased_lr, resolution_at


@dataclass
class TrainResult:
    steps: int
    final_model: Any
    losses: list[float] = field(default_factory=list)
    nan_steps: int = 0
    evaluations: list[dict] = field(default_factory=list)
    final_ema: Any = None  # with --ema-decay: the folder of the model holding the weights' moving average


def _resolutions(cfg: TrainConfig, engine: Backend) -> list[tuple[int, int]] | None:
    if not cfg.resolution_schedule:
        return None
    schedule = parse_resolution_schedule(cfg.resolution_schedule)
    patch = engine.config.vision_config.patch_size
    bad = [size for _, size in schedule if size % patch]
    if bad:
        raise ConfigError(f"--resolution-schedule {cfg.resolution_schedule}: sizes {bad} are not multiples of the "
                          f"model's patch size {patch}")
    return schedule


class Trainer:
    def __init__(self, cfg: TrainConfig, engine: Backend, loader: Any, run: RunFolder, total_steps: int, *,
                 evaluate: Callable[[Any], dict] | None = None, progress: bool = True,
                 stop_after: int | None = None, data_fingerprint: dict | None = None):
        self.cfg, self.engine, self.loader, self.run = cfg, engine, loader, run
        self.total_steps = total_steps
        self.evaluate = evaluate
        self.progress_enabled = progress
        self.stop_after = stop_after  # tests: stop (as if interrupted) after this step
        self.data_fingerprint = data_fingerprint  # saved with checkpoints; a resume on other data is refused
        self.plan = engine.plan  # decided by prepare_training; probe_steps: LP-FT's first phase (0 otherwise)
        if self.plan.probe_steps >= total_steps:
            raise ConfigError(f"lp_steps must be below the run's {total_steps} steps, or LP-FT never trains the "
                              f"full model, got {self.plan.probe_steps}")
        self.warmup_steps = effective_warmup(cfg.warmup_steps, total_steps, self.plan.probe_steps)
        # Several processes (mlx_clip.engine.distributed): rank 0 writes for all of them.
        self.world = getattr(engine, "world", None) or World()
        self.log = RunLog(run.root, tensorboard=cfg.tensorboard) if self.world.is_main else SilentLog(run.metrics_path)
        self.resolutions = _resolutions(cfg, engine)
        self.keep_best = KeepBest(cfg.keep_best, run, self._save_model)
        self.baseline: dict | None = None  # metrics before training, for the forgetting budget
        self.stopped_early = False
        self.step = 0
        self.nan_steps = 0
        self.consecutive_nan = 0
        self._signals = StopSignals()  # SIGINT/SIGTERM: stop at the next step boundary

    # --- state ---------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        state = {"loader": self.loader.state_dict(), "nan_steps": self.nan_steps, "total_steps": self.total_steps,
                 "backend": self.engine.name, "config": self.cfg.to_dict(),
                 "model_config": dataclasses.asdict(self.engine.config), "best": self.keep_best.record,
                 "data": self.data_fingerprint, "warmup_steps": self.warmup_steps}
        if self.world.size > 1:  # absent: one process
            state["world_size"] = self.world.size
        return state

    def save_checkpoint(self):
        return self.run.save(self.step, self.engine.save_state, self.trainer_state(), self.cfg.keep_checkpoints)

    def restore(self, checkpoint) -> None:
        state = read_trainer_state(checkpoint)
        check_resumable(checkpoint, state, self.cfg, self.engine, self.data_fingerprint, world=self.world,
                        total_steps=self.total_steps)
        self.engine.load_state(checkpoint)
        self.loader.load_state_dict(state["loader"])
        self.step = int(state["step"])
        self.nan_steps = int(state.get("nan_steps", 0))
        self.warmup_steps = int(state.get("warmup_steps", self.warmup_steps))  # --steps may grow on resume
        self.keep_best.record = state.get("best")
        self.log.resume_at(self.step)
        self.baseline = self._first_evaluation()

    # --- loop ----------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        self.run.prepare()
        result = TrainResult(steps=self.step, final_model=None, nan_steps=self.nan_steps)
        self._signals.install()
        progress = Progress(self.total_steps, self.step, self.progress_enabled if self.world.is_main else "silent")
        in_step = False
        try:
            window_start, window_images, reported = time.perf_counter(), 0, self.step
            while self.step < self.total_steps:
                if self._should_stop():
                    path = self.save_checkpoint()
                    raise Interrupted(f"interrupted at step {self.step}; checkpoint {path}; "
                                      f"continue with --resume latest")
                if self.resolutions:
                    self.loader.set_image_size(resolution_at(self.resolutions, self.step))
                batch = self.loader.next_batch()
                self._enter_phase(progress)
                lr = phased_lr(self.step, self.total_steps, self.plan.probe_steps, self.cfg.lr, self.warmup_steps,
                               self.cfg.min_lr_ratio)
                if self.cfg.patch_dropout:
                    batch.patch_keep = self._patch_keep(batch)
                in_step = True
                metrics = self.engine.train_step(batch, lr)
                in_step = False
                self.step += 1
                window_images += len(batch.indices)
                result.losses.append(metrics["loss"])
                self._nan_guard(metrics, progress)
                if self.step % self.cfg.log_every == 0 or self.step == self.total_steps or not metrics["ok"]:
                    elapsed = time.perf_counter() - window_start
                    record = {"step": self.step, "loss": metrics["loss"], "lr": lr,
                              "logit_scale": metrics["logit_scale"], "grad_norm": metrics["grad_norm"],
                              "images_per_s": window_images / elapsed if elapsed > 0 else 0.0,
                              "skipped": not metrics["ok"], **self.engine.memory()}
                    if self.resolutions:
                        record["image_size"] = int(batch.pixels.shape[1])
                    if self.cfg.buckets:  # the logged step's bucket
                        record["image_shape"] = [int(n) for n in batch.pixels.shape[1:3]]
                    self.log.write(record)
                    progress.update(self.step - reported, {"loss": metrics["loss"], "lr": lr}, step=self.step)
                    window_start, window_images, reported = time.perf_counter(), 0, self.step
                if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < self.total_steps \
                        and self.consecutive_nan == 0:  # never checkpoint in the middle of a NaN streak
                    self.save_checkpoint()
                if self.evaluate and self.cfg.eval_every and self.step % self.cfg.eval_every == 0 \
                        and self.step < self.total_steps:
                    result.evaluations.append(self._evaluate(progress))
                    if self._forgetting_exceeded(result.evaluations[-1]["eval"], progress):
                        break
            self.save_checkpoint()
            result.final_model = self._save_model(self.run.final) if self.world.is_main else self.run.final
            if self.cfg.ema_decay:
                result.final_ema = self._save_ema() if self.world.is_main else self.run.final_ema
        except TrainingStopped:  # Interrupted included: both have saved what they should
            raise
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once, even mid-save
            raise stopped_at_once(self.step, self.run.latest()) from None
        except BaseException:
            # A crash between steps leaves a consistent state: keep it resumable.
            if not in_step and self.step > 0:
                try:
                    self.save_checkpoint()
                except Exception:  # the original error is the one the user needs
                    pass
            raise
        finally:
            progress.close()
            self.log.close()
            self._signals.restore()
        result.steps, result.nan_steps = self.step, self.nan_steps
        return result

    def _save_ema(self):
        with self.engine.ema_weights():
            return self._save_model(self.run.final_ema)

    def _save_model(self, folder):
        """A plain model folder (transformers' layout). NaFlex trained with --max-num-patches: its
        preprocessor says that budget, so the model runs by default as it was tuned."""
        saved = self.engine.save(folder, to="hf")
        if self.cfg.max_num_patches is not None:
            path = Path(saved) / "preprocessor_config.json"
            processor = json.loads(path.read_text(encoding="utf-8"))
            processor["max_num_patches"] = self.cfg.max_num_patches
            path.write_text(json.dumps(processor, indent=2) + "\n", encoding="utf-8")
        return saved

    def _patch_keep(self, batch):
        from mlx_clip.training.patch_dropout import keep_indices

        patch = self.engine.config.vision_config.patch_size
        height, width = batch.pixels.shape[1:3]
        return keep_indices(self.cfg.seed, self.step, len(batch.indices), (height // patch) * (width // patch),
                            self.cfg.patch_dropout)

    def _should_stop(self) -> bool:
        stop = self._signals.requested or (self.stop_after is not None and self.step >= self.stop_after)
        # Ranks see a signal at different moments: they agree, so all stop before the same step.
        return self.engine.any_rank(stop) if self.world.size > 1 else stop

    def _enter_phase(self, progress: Progress) -> None:
        """LP-FT: at update `probe_steps` the engine starts training everything (its phase is
        saved with its state, so a resumed run switches at the same step)."""
        phase = self.plan.phase_at(self.step)
        if self.plan.probe_steps and phase != self.engine.phase:
            self.engine.set_phase(phase)
            progress.write(f"step {self.step}: LP-FT probe phase done; training the full model "
                           f"({self.engine.trainable_count():,} parameters, fresh optimizer state)")
            self.log.write({"step": self.step, "phase": phase})

    def _nan_guard(self, metrics: dict, progress: Progress) -> None:
        if metrics["ok"]:
            self.consecutive_nan = 0
            return
        self.nan_steps += 1
        self.consecutive_nan += 1
        progress.write(f"step {self.step}: non-finite loss or gradient (loss={metrics['loss']}, "
                       f"grad_norm={metrics['grad_norm']}); update skipped")
        if self.consecutive_nan >= self.cfg.max_nan_steps:
            latest = self.run.latest()
            raise TrainingStopped(f"{self.consecutive_nan} non-finite steps in a row at step {self.step}: stopping. "
                                  f"Last good checkpoint: {latest or 'none (no checkpoint was saved yet)'}. "
                                  "Try a lower --lr or --grad-clip.")

    def _forgetting_exceeded(self, metrics: dict, progress: Progress) -> bool:
        budget, key = self.cfg.max_control_drop, CONTROL_TOP1
        if budget is None or not self.baseline or key not in self.baseline or key not in metrics:
            return False
        drop = self.baseline[key] - metrics[key]
        if drop <= budget:
            return False
        self.stopped_early = True
        progress.write(f"step {self.step}: control top-1 fell {drop:.4f} (from {self.baseline[key]:.4f} to "
                       f"{metrics[key]:.4f}), over the --max-control-drop budget {budget}: stopping early")
        self.log.write({"step": self.step, "early_stop": "max_control_drop", "control_drop": drop})
        return True

    def _evaluate(self, progress: Progress) -> dict:
        metrics = self.evaluate(self.engine)
        record = {"step": self.step, "eval": metrics}
        self.log.write(record)
        progress.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                        if isinstance(v, float) and math.isfinite(v)))
        self.keep_best.consider(metrics, self.step, progress.write)
        return record

    # --- before and after the loop (what finetune() asks of a run) ------------------------
    def log_start(self, facts: dict) -> None:
        """The run's first record: what it trains on and with."""
        self.log.write({"step": 0, "event": "start", **facts})

    def evaluate_before(self) -> dict | None:
        """The held-out metrics before the first step: logged, and the forgetting guard's baseline."""
        if not self.evaluate:
            return None
        self.baseline = self.evaluate(self.engine)
        self.log.write({"step": 0, "eval": self.baseline})
        return self.baseline

    def finish(self, after: dict, echo: Callable[[str], None] = print, after_ema: dict | None = None) -> None:
        """The final evaluation: logged, considered for --keep-best; the log is closed. The EMA
        model's is logged apart, as "eval_ema": it is another model than the one trained, which
        --keep-best and the curves of "eval" follow."""
        self.log.write({"step": self.step, "eval": after})
        if after_ema is not None:
            self.log.write({"step": self.step, "eval_ema": after_ema})
        self.keep_best.consider(after, self.step, echo)
        self.log.close()

    def evaluate_ema(self) -> dict | None:
        """The held-out metrics of the weights' moving average (--ema-decay), by the same evaluation."""
        if not (self.evaluate and self.cfg.ema_decay):
            return None
        with self.engine.ema_weights():
            return self.evaluate(self.engine)

    def _first_evaluation(self) -> dict | None:
        """A resumed run's metrics before training, from its log (the forgetting guard's baseline)."""
        for record in MetricsLog(self.run.metrics_path).read():
            if record.get("step") == 0 and "eval" in record:
                return record["eval"]
        return None
