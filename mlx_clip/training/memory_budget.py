"""--memory-budget: the largest feature-caching micro-batch that fits, chosen before training.

Each probe is a fresh process (so the run's own weights, optimizer and allocator are untouched,
and no probe counts another's memory) that trains two steps of the run's model and options on
full-length texts (the first step creates the optimizer state, the second holds it while
updating it: the steady peak) and reads the process's peak memory: MLX's allocator peak, torch's
CUDA allocator, or the resident set on a CPU. Two small probes give a first guess, a line of a
fixed part (weights, optimizer state, framework) and a part per pair, plus the contrastive head on
the whole batch (its B x B logits and B x P embeddings) from its sizes. Memory is not linear in the
micro-batch, though: flat while a step's transients stay under what the first step leaves, then
rising, so small probes cannot see where it rises. The guess is therefore checked by a probe of the
run's own batch at the chosen micro-batch; one over the budget refits the line through it and tries
a smaller micro-batch, until one is measured to fit. The choice keeps a margin of `MARGIN` for what
a probe cannot see (allocator fragmentation, data loading).
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from dataclasses import dataclass

from mlx_clip.errors import ConfigError

MARGIN = 0.85
PROBE_SIZES = (1, 8)  # micro-batches of the first guess's probes, each of twice as many pairs
PROBE_STEPS = 2  # the second step holds the optimizer state the first created while it updates it
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2 ** 10, "m": 1e6, "mb": 1e6, "mib": 2 ** 20,
          "g": 1e9, "gb": 1e9, "gib": 2 ** 30, "t": 1e12, "tb": 1e12, "tib": 2 ** 40}


def parse_size(text: str) -> int:
    """'8GB', '512MiB', '1.5g', '2000000' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"--memory-budget {text!r}: expected a size such as 8GB, 512MB or 12GiB")
    return int(float(match.group(1)) * _UNITS[unit])


def human(n: float, *, up: bool = False) -> str:
    """Bytes as a short size; `up` rounds up, for a figure that must be enough."""
    import math

    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            value = math.ceil(n / size * 100) / 100 if up else n / size
            return f"{value:.2f} {unit}"
    return f"{math.ceil(n) if up else n:.0f} B"


@dataclass(frozen=True)
class MemoryModel:
    fixed: float  # bytes: weights, optimizer state, framework, what a step needs whatever its size
    per_pair: float  # bytes per (image, text) pair of a micro-batch

    def head(self, batch: int, dim: int) -> float:
        # float32 logits and their gradient and softmax copies (~4 x B x B), and the cached
        # embeddings with their gradients (4 x B x P).
        return 4.0 * 4 * batch * batch + 4.0 * 4 * batch * dim

    def need(self, micro: int, batch: int, dim: int) -> float:
        return self.fixed + self.per_pair * micro + self.head(batch, dim)

    @classmethod
    def through(cls, a: tuple[int, float], b: tuple[int, float]) -> "MemoryModel":
        """The line through two (micro-batch, bytes) points, never falling with the micro-batch."""
        per_pair = max(0.0, (b[1] - a[1]) / (b[0] - a[0]))
        return cls(fixed=a[1] - per_pair * a[0], per_pair=per_pair)


def choose_micro_batch(model: MemoryModel, budget: int, batch: int, dim: int) -> int:
    """The largest micro-batch (up to `batch`: no caching) whose need fits `budget` with the margin;
    a `ConfigError` naming the smallest budget that works when not even one pair fits."""
    usable = budget * MARGIN
    if model.need(1, batch, dim) > usable:
        raise too_small(budget, model.need(1, batch, dim))
    micro = int((usable - model.fixed - model.head(batch, dim)) // model.per_pair) if model.per_pair > 0 else batch
    return max(1, min(batch, micro))


def too_small(budget: int, one_pair: float) -> ConfigError:
    # 2% over the exact figure: two probes of the same run differ by a little.
    smallest = one_pair / MARGIN * 1.02
    return ConfigError(f"--memory-budget {human(budget)} is too small for this model and batch: one pair per "
                       f"micro-batch needs {human(one_pair)}; the smallest budget that works is "
                       f"{human(smallest, up=True)}")


def _peak_bytes(engine) -> int:
    memory = engine.memory()
    for key in ("peak_bytes", "peak_rss_bytes", "active_bytes"):
        if key in memory:
            return int(memory[key])
    raise ConfigError("--memory-budget: this engine reports no memory figure to probe with")


def probe_worker(spec: dict) -> dict:
    """In a probe process: the peak memory of `PROBE_STEPS` steps of `batch` pairs in micro-batches
    of `micro` (feature caching when fewer than `batch`), and the embedding width."""
    from mlx_clip.engine.protocol import load_backend
    from mlx_clip.training.options import TrainConfig

    batch, micro = int(spec["batch"]), int(spec["micro"])
    values = {**spec["config"], "batch_size": batch, "micro_batch_size": micro if micro < batch else None,
              "memory_budget": None, "resume": None}
    cfg = TrainConfig(**values)
    engine = load_backend(cfg.backend, spec["folder"], device=cfg.device, dtype=cfg.parameter_dtype,
                          allow_pickle=cfg.allow_pickle, image_size=cfg.image_size)
    engine.prepare_training(cfg)
    data = probe_batch(engine.config, batch, int(spec.get("negative_slots", 0)))
    for _ in range(PROBE_STEPS):
        engine.train_step(data, 0.0)
    peak = _peak_bytes(engine)
    return {"peak": peak, "dim": int(engine.encode_texts(data.input_ids[:1]).shape[1])}


def probe_batch(config, batch: int, negative_slots: int = 0):
    """The probe's batch: full-length texts, the most a step holds; with hard-negative captions,
    every slot filled with one, since the text tower runs on each."""
    import numpy as np

    from mlx_clip.data.synthetic import synthetic_batch

    data = synthetic_batch(config, batch)
    if negative_slots:
        data.negative_ids = np.repeat(data.input_ids[:, None, :], negative_slots, axis=1)
        data.negative_mask = np.ones((batch, negative_slots), bool)
    return data


def measure(cfg, folder, batch: int, micro: int, negative_slots: int = 0) -> tuple[int, int]:
    """(peak bytes, embedding width) of `cfg`'s run at `batch` pairs in micro-batches of `micro`,
    measured by a probe in a fresh process."""
    spec = json.dumps({"config": dataclasses.asdict(cfg), "folder": str(folder), "batch": batch, "micro": micro,
                       "negative_slots": negative_slots})
    done = subprocess.run([sys.executable, "-m", "mlx_clip.training.memory_budget", spec], capture_output=True, text=True,
                          timeout=1800)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"--memory-budget: the memory probe failed ({last})")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return int(result["peak"]), int(result["dim"])


def probe(cfg, folder, negative_slots: int = 0) -> tuple[MemoryModel, int]:
    """The first guess, (memory model, embedding width): the line through the peaks at the
    `PROBE_SIZES` micro-batches."""
    small, large = PROBE_SIZES
    small_peak, dim = measure(cfg, folder, 2 * small, small, negative_slots)
    large_peak, _ = measure(cfg, folder, 2 * large, large, negative_slots)
    return MemoryModel.through((small, small_peak), (large, large_peak)), dim


def fit(cfg, folder, budget: int, negative_slots: int = 0) -> tuple[int, int, MemoryModel]:
    """(micro-batch, its measured peak, the model that chose it): the largest micro-batch of
    `cfg.batch_size` the model allows under `budget` with the margin, measured on the run's own
    batch; a measurement over it refits the line through the first probe and the measured point
    (steeper than the line that chose it), which chooses a smaller micro-batch, until one is
    measured to fit. A `ConfigError` names the smallest budget that works when one pair is too many."""
    model, dim = probe(cfg, folder, negative_slots)
    batch, small = cfg.batch_size, PROBE_SIZES[0]
    first = (small, model.fixed + model.per_pair * small)
    micro = choose_micro_batch(model, budget, batch, dim)
    while True:
        peak, _ = measure(cfg, folder, batch, micro, negative_slots)
        if peak <= budget * MARGIN:
            return micro, peak, model
        if micro <= small:
            raise too_small(budget, peak)
        model = MemoryModel.through(first, (micro, peak - model.head(batch, dim)))
        micro = max(1, min(micro - 1, choose_micro_batch(model, budget, batch, dim)))


def budgeted(cfg, folder, echo=print, negative_slots: int = 0):
    """`cfg` with the micro-batch the budget allows. A resumed run keeps the one it started with
    (another would change the float32 summation order, and resume is exact). `negative_slots`:
    hard-negative captions per pair, which the probes embed too."""
    budget = parse_size(cfg.memory_budget)
    if cfg.resume:
        return cfg
    micro, peak, model = fit(cfg, folder, budget, negative_slots)
    what = "no feature caching needed" if micro >= cfg.batch_size else f"micro-batch {micro} (feature caching)"
    echo(f"memory budget {human(budget)}: batch {cfg.batch_size} with {what}; expected peak {human(peak)} "
         f"(measured by a probe of this batch; first guess {human(model.fixed)} fixed + {human(model.per_pair)} "
         f"per pair)")
    return dataclasses.replace(cfg, micro_batch_size=None if micro >= cfg.batch_size else micro)


def main() -> None:
    import mlx_clip  # noqa: F401  (the BLAS loader before any engine)

    print(json.dumps(probe_worker(json.loads(sys.argv[1]))))


if __name__ == "__main__":
    main()
