"""`python -m mlx_clip.benchmarks.patch_dropout`: what patch dropout (FLIP) saves in a training step.

Per engine, one process, one prepared model: steps with every patch and steps keeping `1 - rate`
of them alternate round by round (so the machine's drift touches both alike), on the same
synthetic batch; the medians and their ratio are printed. The indices are the trainer's own
(`training.patch_dropout.keep_indices`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from mlx_clip.benchmarks.worker import SIZES, engine_sync
from mlx_clip.data.synthetic import synthetic_batch
from mlx_clip.training.patch_dropout import keep_indices


def measure(engine_name: str, size: str, batch_size: int, rate: float, rounds: int) -> dict:
    from mlx_clip.api import resolve
    from mlx_clip.engine.protocol import load_backend
    from mlx_clip.training.options import TrainConfig

    folder = resolve(SIZES[size])
    engine = load_backend(engine_name, folder)
    cfg = TrainConfig(model=str(folder), backend=engine_name, lr=1e-5, warmup_steps=0, patch_dropout=rate)
    engine.prepare_training(cfg)
    batch = synthetic_batch(engine.config, batch_size)
    vision = engine.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    sync = engine_sync(engine)
    times: dict[str, list[float]] = {"all patches": [], f"patch dropout {rate:g}": []}

    def step(keep, step_index: int) -> float:
        batch.patch_keep = keep_indices(0, step_index, batch_size, patches, rate) if keep else None
        started = time.perf_counter()
        engine.train_step(batch, cfg.lr)
        sync()
        return time.perf_counter() - started

    for warm in (False, True):  # each variant's first step builds (MLX compiles) its graph
        step(warm, 0)
    for round_index in range(rounds):
        for keep, name in ((False, "all patches"), (True, f"patch dropout {rate:g}")):
            times[name].append(step(keep, round_index + 1))
    medians = {name: statistics.median(values) for name, values in times.items()}
    full, dropped = medians.values()
    return {"engine": engine_name, "size": size, "batch": batch_size, "patches": patches, "rate": rate,
            "seconds": times, "median_seconds": medians, "speedup": full / dropped}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="b32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rate", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--engines", default="mlx,torch")
    args = parser.parse_args(argv)
    for name in args.engines.split(","):
        result = measure(name, args.size, args.batch, args.rate, args.rounds)
        print(json.dumps(result))
        full, dropped = result["median_seconds"].values()
        print(f"{name}: step {full:.2f} s with all {result['patches']} patches, {dropped:.2f} s keeping "
              f"{1 - args.rate:g} of them: {result['speedup']:.2f}x")


if __name__ == "__main__":
    main()
