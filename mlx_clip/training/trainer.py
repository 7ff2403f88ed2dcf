"""The one training loop. It imports neither framework: an engine (`mlx_clip.engine.protocol.Backend`,
after `prepare_training`) does the step on numpy batches, and everything else — data order,
schedule, clipping policy, NaN guard, evaluation, checkpoints, logging, interruption — is decided
here, the same for both engines."""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlx_clip.engine.base import MODEL, STATE_FILE
from mlx_clip.engine.protocol import Backend
from pathlib import Path

from convert.safetensors_io import read_header
from mlx_clip.training.run_folder import RunFolder, read_trainer_state
from mlx_clip.data.fingerprint import differences
from mlx_clip.engine.distributed import World
from mlx_clip.errors import CheckpointError, ConfigError, MlxClipError
from mlx_clip.training.monitor import Progress, RunLog, SilentLog
from mlx_clip.engine.policy import training_plan
from mlx_clip.training.schedule import parse_resolution_schedule, phased_lr, resolution_at
from mlx_clip.training.options import TrainConfig


class TrainingStopped(MlxClipError):
    """The run stopped before its last step (non-finite losses, interruption)."""


class Interrupted(TrainingStopped):
    exit_code = 130


@dataclass
class TrainResult:
    steps: int
    final_model: Any
    losses: list[float] = field(default_factory=list)
    nan_steps: int = 0
    evaluations: list[dict] = field(default_factory=list)


# --keep-best names for the evaluation metrics people ask for most.
BEST_ALIASES = {"acc1": "val_zero_shot_top1", "top1": "val_zero_shot_top1", "R@1": "val_image_retrieval_R@1",
                "control_acc1": "control_zero_shot_top1"}
# Options a resumed run may change: they decide how long it runs, what it logs, saves and
# evaluates, where and how fast a step runs — never which samples a step sees or the update it
# makes. Every other option must equal the checkpoint's (an option added later is frozen unless
# named here). --model may name the same architecture elsewhere (checked tensor by tensor; the
# checkpoint holds every weight); the data are compared by their fingerprint, not by path.
RESUME_FREE = frozenset({
    "steps", "epochs", "log_every", "save_every", "keep_checkpoints", "evaluate", "eval_every", "max_control_drop",
    "max_nan_steps", "tensorboard", "keep_best", "control_data", "num_workers", "max_bad_fraction",
    "gradient_checkpointing", "memory_budget", "device", "allow_pickle", "resume", "overwrite", "out", "model",
    "data", "val_data", "image_column", "caption_column"})


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def check_resumable(checkpoint, state: dict, cfg: TrainConfig, engine: Backend,
                    data_fingerprint: dict | None = None) -> None:
    """Name what differs between a checkpoint and the run resuming it, before any tensor is
    loaded: training options, the data, the model's architecture, then each saved tensor's name
    and shape."""
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


def effective_warmup(warmup_steps: int, total_steps: int, probe_steps: int = 0) -> int:
    """The warmup a run follows: --warmup-steps, or a tenth of the shortest phase when it is not
    below it (LP-FT warms up anew in each of its two phases). A warmup as long as the run would
    keep the learning rate from ever reaching --lr (`--steps 10` under the default 50); the run
    says when it scales it, and a resumed run keeps the warmup it started with."""
    shortest = total_steps if not probe_steps else min(probe_steps, total_steps - probe_steps)
    return warmup_steps if warmup_steps < shortest else shortest // 10


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
        self.plan = training_plan(cfg)  # its probe_steps: LP-FT's first phase (0 for other strategies)
        if self.plan.probe_steps >= total_steps:
            raise ConfigError(f"lp_steps must be below the run's {total_steps} steps, or LP-FT never trains the "
                              f"full model, got {self.plan.probe_steps}")
        self.warmup_steps = effective_warmup(cfg.warmup_steps, total_steps, self.plan.probe_steps)
        # Several processes (mlx_clip.engine.distributed): rank 0 writes for all of them.
        self.world = getattr(engine, "world", None) or World()
        self.log = RunLog(run.root, tensorboard=cfg.tensorboard) if self.world.is_main else SilentLog(run.metrics_path)
        self.resolutions = _resolutions(cfg, engine)
        self.best: dict | None = None  # --keep-best: {metric, value, step}
        self.baseline: dict | None = None  # metrics before training, for the forgetting budget
        self.stopped_early = False
        self.step = 0
        self.nan_steps = 0
        self.consecutive_nan = 0
        self._interrupted = False

    # --- state ---------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        state = {"loader": self.loader.state_dict(), "nan_steps": self.nan_steps, "total_steps": self.total_steps,
                 "backend": self.engine.name, "config": self.cfg.to_dict(),
                 "model_config": dataclasses.asdict(self.engine.config), "best": self.best,
                 "data": self.data_fingerprint, "warmup_steps": self.warmup_steps}
        if self.world.size > 1:  # absent: one process
            state["world_size"] = self.world.size
        return state

    def save_checkpoint(self):
        return self.run.save(self.step, self.engine.save_state, self.trainer_state(), self.cfg.keep_checkpoints)

    def restore(self, checkpoint) -> None:
        state = read_trainer_state(checkpoint)
        if state.get("backend") != self.engine.name:
            raise MlxClipError(f"{checkpoint} was written by the {state.get('backend')} engine; "
                               f"resume it with --backend {state.get('backend')}")
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.world.size:
            raise CheckpointError(f"--resume {checkpoint}: the run was trained by {saved_world} process(es), this one "
                                  f"has {self.world.size}; resume with {saved_world} (the batch's split and the "
                                  "summation order follow the world size)")
        check_resumable(checkpoint, state, self.cfg, self.engine, self.data_fingerprint)
        if int(state["step"]) > self.total_steps:
            raise CheckpointError(f"--resume {checkpoint}: the run is at step {state['step']}, beyond this run's "
                                  f"{self.total_steps} steps; give --steps {state['step']} or more")
        self.engine.load_state(checkpoint)
        self.loader.load_state_dict(state["loader"])
        self.step = int(state["step"])
        self.nan_steps = int(state.get("nan_steps", 0))
        self.warmup_steps = int(state.get("warmup_steps", self.warmup_steps))  # --steps may grow on resume
        self.best = state.get("best")
        self.log.resume_at(self.step)

    # --- loop ----------------------------------------------------------------------------
    def _on_sigint(self, signum, frame) -> None:
        self._interrupted = True
        # A second Ctrl-C stops at once; the last complete checkpoint is still intact.
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def fit(self) -> TrainResult:
        self.run.prepare()
        result = TrainResult(steps=self.step, final_model=None, nan_steps=self.nan_steps)
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        # SIGTERM too: a launcher passes Ctrl-C on as SIGTERM, and `kill`, `timeout`, a container's
        # stop or a scheduler's preemption send it: each stops at a step boundary with a checkpoint.
        previous_term = signal.signal(signal.SIGTERM, self._on_sigint)
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
            result.final_model = self.engine.save(self.run.final, to="hf") if self.world.is_main else self.run.final
        except TrainingStopped:  # Interrupted included: both have saved what they should
            raise
        except KeyboardInterrupt:
            # A second Ctrl-C (the first asks for a checkpoint at the next step): stop at once, even
            # mid-save. A save is renamed into place whole, so the newest complete checkpoint stands.
            latest = self.run.latest()
            where = f"the last complete checkpoint is {latest}; continue with --resume latest" if latest else \
                "no checkpoint was saved yet: run the same command again to start over"
            raise Interrupted(f"stopped at once at step {self.step}; {where}") from None
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
            signal.signal(signal.SIGINT, previous)
            signal.signal(signal.SIGTERM, previous_term)
        result.steps, result.nan_steps = self.step, self.nan_steps
        return result

    def _should_stop(self) -> bool:
        stop = self._interrupted or (self.stop_after is not None and self.step >= self.stop_after)
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
        budget, key = self.cfg.max_control_drop, "control_zero_shot_top1"
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
        self.consider_best(metrics, progress.write)
        return record

    def consider_best(self, metrics: dict, echo: Callable[[str], None] = print) -> None:
        """--keep-best: save the model to OUT/best when this evaluation beats every earlier one."""
        wanted = self.cfg.keep_best
        if not wanted:
            return
        key = BEST_ALIASES.get(wanted, wanted)
        if key not in metrics:
            raise ConfigError(f"--keep-best {wanted}: this run's evaluations have no such metric; they have "
                              f"{', '.join(sorted(metrics))} (or the aliases {', '.join(BEST_ALIASES)})")
        value = float(metrics[key])
        if self.best is not None and not value > self.best["value"]:
            return
        self.best = {"metric": key, "value": value, "step": self.step}
        self.run.replace_best(lambda folder: self.engine.save(folder, to="hf"), self.best)
        echo(f"step {self.step}: best {key} so far ({value:.4f}); saved to {self.run.best}")
