"""--memory-budget: the largest feature-caching micro-batch that fits, chosen before training.

A short probe in a fresh process (so the run's own weights, optimizer and allocator are untouched)
trains two feature-cached steps of the run's model and options at two micro-batch sizes and
reads the process's peak memory after each: MLX's allocator peak, torch's CUDA allocator, or the
resident set on a CPU. Memory is close to linear in the micro-batch (activations), so two points
give a fixed part (weights, optimizer state, framework) and a part per pair; the contrastive head
on the whole batch (its B x B logits and B x P embeddings) is added from its sizes. The choice
keeps a margin of `MARGIN` for what a probe cannot see (allocator fragmentation, data loading).
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
PROBE_SIZES = (2, 8)
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


def choose_micro_batch(model: MemoryModel, budget: int, batch: int, dim: int) -> int:
    """The largest micro-batch (up to `batch`: no caching) whose need fits `budget` with the margin;
    a `ConfigError` naming the smallest budget that works when not even one pair fits."""
    usable = budget * MARGIN
    if model.need(1, batch, dim) > usable:
        # 2% over the exact figure: two probes of the same run differ by a little.
        smallest = model.need(1, batch, dim) / MARGIN * 1.02
        raise ConfigError(f"--memory-budget {human(budget)} is too small for this model and batch: one pair per "
                          f"micro-batch needs {human(model.need(1, batch, dim))} ({human(model.fixed)} fixed, "
                          f"{human(model.per_pair)} per pair); the smallest budget that works is {human(smallest, up=True)}")
    micro = int((usable - model.fixed - model.head(batch, dim)) // model.per_pair) if model.per_pair > 0 else batch
    return max(1, min(batch, micro))


def _peak_bytes(engine) -> int:
    memory = engine.memory()
    for key in ("peak_bytes", "peak_rss_bytes", "active_bytes"):
        if key in memory:
            return int(memory[key])
    raise ConfigError("--memory-budget: this engine reports no memory figure to probe with")


def _probe_batch(config, batch_size: int):
    """Seeded pixels at the model's size and full-length (77-token) texts: the most a step holds."""
    import numpy as np

    from mlx_clip.data.loader import Batch

    rng = np.random.default_rng(0)
    size = config.vision_config.image_size
    pixels = rng.standard_normal((batch_size, size, size, 3)).astype(np.float32)
    length = config.text_config.max_position_embeddings
    vocab = config.text_config.vocab_size
    ids = rng.integers(1, vocab - 2, size=(batch_size, length))
    return Batch(pixels, ids, None, np.arange(batch_size), np.arange(batch_size))


def probe_worker(spec: dict) -> dict:
    """In the probe process: peak memory after one feature-cached step at each probe size."""
    from mlx_clip.backend import load_backend
    from mlx_clip.train_config import TrainConfig

    peaks, dim = {}, None
    for micro in PROBE_SIZES:
        values = {**spec["config"], "micro_batch_size": micro, "batch_size": 2 * micro, "memory_budget": None,
                  "resume": None}
        cfg = TrainConfig(**values)
        engine = load_backend(cfg.backend, spec["folder"], device=cfg.device, dtype=cfg.parameter_dtype,
                              allow_pickle=cfg.allow_pickle, image_size=cfg.image_size)
        engine.prepare_training(cfg)
        batch = _probe_batch(engine.config, 2 * micro)
        engine.train_step(batch, 0.0)
        peaks[micro] = _peak_bytes(engine)
        dim = int(engine.encode_texts(batch.input_ids[:1]).shape[1])
        del engine
    return {"peaks": peaks, "dim": dim}


def probe(cfg, folder) -> tuple[MemoryModel, int]:
    """(memory model, embedding width) of `cfg`'s run on the model in `folder`."""
    spec = json.dumps({"config": dataclasses.asdict(cfg), "folder": str(folder)})
    done = subprocess.run([sys.executable, "-m", "mlx_clip.memory_budget", spec], capture_output=True, text=True,
                          timeout=1800)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"--memory-budget: the memory probe failed ({last})")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    peaks = {int(k): v for k, v in result["peaks"].items()}
    small, large = PROBE_SIZES
    # Two points in one process each: the second also pays for allocator caches of the first, which
    # only makes the per-pair figure larger (a safe error).
    per_pair = max(0.0, (peaks[large] - peaks[small]) / (large - small))
    return MemoryModel(fixed=peaks[small] - per_pair * small, per_pair=per_pair), result["dim"]


def budgeted(cfg, folder, echo=print):
    """`cfg` with the micro-batch the budget allows. A resumed run keeps the one it started with
    (another would change the float32 summation order, and resume is exact)."""
    budget = parse_size(cfg.memory_budget)
    if cfg.resume:
        return cfg
    model, dim = probe(cfg, folder)
    micro = choose_micro_batch(model, budget, cfg.batch_size, dim)
    need = model.need(micro, cfg.batch_size, dim)
    what = "no feature caching needed" if micro >= cfg.batch_size else f"micro-batch {micro} (feature caching)"
    echo(f"memory budget {human(budget)}: batch {cfg.batch_size} with {what}; expected peak {human(need)} "
         f"(probe: {human(model.fixed)} fixed + {human(model.per_pair)} per pair)")
    return dataclasses.replace(cfg, micro_batch_size=None if micro >= cfg.batch_size else micro)


def main() -> None:
    import mlx_clip  # noqa: F401  (the BLAS loader before any engine)

    print(json.dumps(probe_worker(json.loads(sys.argv[1]))))


if __name__ == "__main__":
    main()
