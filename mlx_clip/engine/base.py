"""What both engines share, written once: the state file and its key prefixes, the attributes
every engine has, loading from a folder after choosing the device, preparing a run (the options
with the model's loss resolved and the training plan, decided here and read by the trainer),
LP-FT's phase switch, and the matmul timer. Each engine (`mlx_backend/backend.py`,
`torch_backend/backend.py`) supplies only its framework's hooks: `select_device`, `load`,
`matmul_runner`, `join`, `start_training`, `enter_phase`."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_clip.engine.distributed import World
from mlx_clip.engine.policy import TrainingPlan, for_model, layer_decay_table, tower_depths, training_plan

# What every engine's save_state writes into a checkpoint folder, and the prefixes of its keys:
# the trained module's weights, the optimizer's state, L2-SP's anchors and the weights' moving
# average (torch; MLX keeps both in its optimizer state, under "anchor" and "ema"), and LP-FT's
# phase, which decides which optimizer state there is.
STATE_FILE = "engine_state.safetensors"
MODEL, OPTIM, ANCHOR, EMA = "model/", "optim/", "anchor/", "ema/"
PROBE_FLAG = "phase/probe"


def prefixed(prefix: str, items: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    return {prefix + name: value for name, value in items}


def unprefixed(prefix: str, tensors: dict[str, Any]) -> dict[str, Any]:
    """The entries of `tensors` under `prefix`, with it taken off."""
    return {name[len(prefix):]: value for name, value in tensors.items() if name.startswith(prefix)}


def median_seconds(run: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """The median wall time of `run` over `repeats` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class Training:
    """What an engine trains with once `prepare_training` has run, in its framework's objects."""

    module: Any  # the CLIP plus SigLIP's learnable bias (each engine's TrainModule)
    optimizer: Any
    step: Callable  # (pixels, input ids, positive ids, lr) -> (loss, grad norm, ok)
    scaler: Any = None  # torch's loss scaler under float16 mixed precision
    anchors: dict | None = None  # L2-SP: the starting value of each trained tensor (torch)
    ema: dict | None = None  # --ema-decay: each trained tensor's float32 moving average (torch)


class EngineBase:
    """The orchestration of an engine; subclasses add the framework."""

    name: str
    config: Any  # model.config.CLIPConfig
    training: Training | None = None  # once prepare_training has run
    source: Path | None = None  # the folder the model was loaded from (side files of a saved copy)
    phase = "full"  # policy.PHASES: what trains now (LP-FT starts with "probe")
    world = World()  # the processes training together, once prepare_training joined them
    watchdog = None  # distributed.Watchdog bounding each collective, under a launcher
    train_config = None  # the run's TrainConfig with the model family's loss resolved
    plan: TrainingPlan | None = None  # what the run trains, decided once from train_config

    # --- loading --------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder, *, dtype=None, allow_pickle=False, device=None, image_size=None, quantize=None):
        """`quantize` (bits): the Linears quantized for inference, which only the MLX engine has."""
        if quantize is not None and cls.name != "mlx":
            from mlx_clip.errors import ConfigError

            raise ConfigError(f"--quantize {quantize} runs MLX's quantized layers, in the MLX engine only: use "
                              f"--backend mlx, or drop --quantize to run the {cls.name} engine in float")
        chosen = cls.select_device(device)  # refused before any weight is read
        engine = cls.load(folder, chosen, dtype=dtype, allow_pickle=allow_pickle, image_size=image_size,
                          quantize=quantize)
        engine.source = Path(folder)
        return engine

    @classmethod
    def matmul_gflops(cls, size: int, repeats: int = 5, dtype: str = "float32") -> float:
        """(size x size) @ (size x size) throughput in `dtype`, median of `repeats` after a warm-up."""
        return 2 * size ** 3 / median_seconds(cls.matmul_runner(size, dtype), repeats) / 1e9

    # --- training -------------------------------------------------------------------------
    def prepare_training(self, cfg) -> None:
        """Resolve the options for this model, decide the plan, join the launcher's processes,
        then build the engine's optimizer and step."""
        self.train_config = for_model(cfg, self.config)  # the loss of the model's family unless chosen
        self.plan = training_plan(self.train_config)
        self.join()
        self.world.check_batch(self.train_config.batch_size)
        self.training = self.start_training()
        self.phase = self.plan.phase_at(0)

    def set_phase(self, phase: str) -> None:
        """Train what `phase` trains from the next step on, with a fresh optimizer (LP-FT)."""
        if phase != self.phase:
            self.training = self.enter_phase(phase)
            self.phase = phase

    @property
    def phased(self) -> bool:
        """Whether the run has LP-FT's two phases (its checkpoints then record the phase)."""
        return bool(self.plan and self.plan.probe_steps)

    def layer_decay_table(self) -> list[dict]:
        """The run's layer-wise lr decay, one row per (tower, layer): tower, layer, lr_scale,
        parameters. LP-FT's probe phase trains only the top, at scale 1: the rows are those of its
        second phase, which trains everything."""
        sizes = self.parameter_sizes(trainable=not self.phased)
        return layer_decay_table(sizes, self.train_config.layer_decay, tower_depths(self.config))

    # --- hooks ----------------------------------------------------------------------------
    @classmethod
    def select_device(cls, requested: str | None):
        raise NotImplementedError

    @classmethod
    def load(cls, folder, device, *, dtype, allow_pickle, image_size, quantize=None) -> "EngineBase":
        raise NotImplementedError

    @classmethod
    def matmul_runner(cls, size: int, dtype: str) -> Callable[[], object]:
        """A call that multiplies two random (size x size) matrices and waits for the result."""
        raise NotImplementedError

    def join(self) -> None:
        """Under the engine's launcher, join its process group (set `world`, `watchdog`)."""

    def start_training(self) -> Training:
        raise NotImplementedError

    def enter_phase(self, phase: str) -> Training:
        raise NotImplementedError

    def parameter_sizes(self, trainable: bool = True) -> dict[str, int]:
        """Name -> element count of the trained module's parameters (only those training now)."""
        raise NotImplementedError

    def ema_weights(self):
        """A context in which the model holds the moving average of its trained weights (in the
        model's dtypes), the trained ones restored on leaving; needs `ema_decay`."""
        raise NotImplementedError
