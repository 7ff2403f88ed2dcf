"""`python -m mlx_clip.benchmarks.compile`: what `--compile` (torch.compile, Inductor) gives the torch
engine's training step, beside eager.

One process, two engines on the same weights: eager and compiled. The compiled one's first steps
(tracing and code generation) are timed apart as the compile cost; then steps alternate round by
round on the same synthetic batch, so the machine's drift touches both alike, and the medians and
their ratio are printed. Both engines take the same updates from the same start, so their losses
must agree to float32 rounding; the largest relative difference is printed too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from mlx_clip.benchmarks.worker import SIZES, engine_sync
from mlx_clip.data.synthetic import synthetic_batch
from mlx_clip.environment import cpu


def measure(size: str, batch_size: int, rounds: int) -> dict:
    from mlx_clip.api import resolve
    from mlx_clip.engine.protocol import load_backend
    from mlx_clip.training.options import TrainConfig

    folder = resolve(SIZES[size])
    engines, configs = {}, {}
    for name, compiled in (("eager", False), ("compiled", True)):
        engines[name] = load_backend("torch", folder)
        configs[name] = TrainConfig(model=str(folder), backend="torch", lr=1e-5, warmup_steps=0, compile=compiled)
        engines[name].prepare_training(configs[name])
    batch = synthetic_batch(engines["eager"].config, batch_size)
    sync = engine_sync(engines["eager"])

    def step(name: str) -> tuple[float, float]:
        started = time.perf_counter()
        record = engines[name].train_step(batch, 1e-5)
        sync()
        return time.perf_counter() - started, float(record["loss"])

    # Inductor compiles at the first call and again when the backward first runs; the second step
    # shows whether anything is still compiling.
    first = [step("compiled")[0] for _ in range(2)]
    eager_first = [step("eager")[0] for _ in range(2)]
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    losses: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(rounds):
        for name in ("eager", "compiled"):
            seconds, loss = step(name)
            times[name].append(seconds)
            losses[name].append(loss)
    medians = {name: statistics.median(values) for name, values in times.items()}
    drift = max(abs(a - b) / abs(a) for a, b in zip(losses["eager"], losses["compiled"]))
    return {"engine": "torch", "size": size, "batch": batch_size, "cpu": cpu()["model"],
            "compile_seconds": first, "eager_first_seconds": eager_first,
            "seconds": times, "median_seconds": medians, "speedup": medians["eager"] / medians["compiled"],
            "losses": losses, "max_loss_rel_diff": drift}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="b32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    result = measure(args.size, args.batch, args.rounds)
    print(json.dumps(result))
    medians = result["median_seconds"]
    print(f"torch {args.size}, batch {args.batch}: step {medians['eager']:.3f} s eager, {medians['compiled']:.3f} s compiled "
          f"({result['speedup']:.2f}x); compiling took {result['compile_seconds'][0]:.1f} s then "
          f"{result['compile_seconds'][1]:.1f} s; losses agree to {result['max_loss_rel_diff']:.1e} (relative)")


if __name__ == "__main__":
    main()
