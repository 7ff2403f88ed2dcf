"""`python -m mlx_clip.benchmarks.memory`: peak memory and images/s of one training step against the batch
size, for a plain step, a gradient-checkpointed one and a feature-cached one (--micro-batch-size),
in both engines, each point in a fresh process. Writes memory.json, memory.md and memory.png.

Memory is what the step adds on top of the loaded model: MLX's allocator peak (mx.get_peak_memory
after a reset, the figure MLX reports on Metal and CPU alike) minus what was allocated before the
first step (weights, optimizer state), and for torch on the CPU the peak
resident set (VmHWM) minus the resident set before the first step; torch's CUDA/MPS allocators
would report their own, but this machine has neither.
"""

from __future__ import annotations

import mlx_clip  # noqa: F401  (the BLAS loader, as the workers have it)

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MODES = ("plain", "checkpointed", "cached")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def worker(args: dict) -> dict:
    from mlx_clip.benchmarks.worker import synthetic_batch
    from mlx_clip.api import resolve
    from mlx_clip.engine.protocol import load_backend
    from mlx_clip.training.options import TrainConfig

    folder = resolve(args["model"])
    engine = load_backend(args["engine"], folder)
    mode = args["mode"]
    cfg = TrainConfig(model=str(folder), backend=args["engine"], batch_size=args["batch_size"], warmup_steps=0,
                      gradient_checkpointing=mode == "checkpointed",
                      micro_batch_size=args["micro"] if mode == "cached" else None)
    engine.prepare_training(cfg)
    batch = synthetic_batch(engine.config, args["batch_size"])
    if args["engine"] == "mlx":
        import mlx.core as mx

        mx.reset_peak_memory()
        active_before = int(mx.get_active_memory())  # the weights and optimizer state
    rss_before = _status_kib("VmRSS") * 1024
    times = []
    for _ in range(args["steps"]):
        start = time.perf_counter()
        metrics = engine.train_step(batch, 1e-5)
        times.append(time.perf_counter() - start)
    if args["engine"] == "mlx":
        import mlx.core as mx

        step_bytes = int(mx.get_peak_memory()) - active_before
    else:
        step_bytes = _status_kib("VmHWM") * 1024 - rss_before
    return {"step_bytes": step_bytes, "seconds": min(times), "images_per_s": args["batch_size"] / min(times),
            "loss": metrics["loss"]}


def measure(engine: str, mode: str, batch_size: int, model: str, micro: int, steps: int) -> dict:
    spec = json.dumps({"engine": engine, "mode": mode, "batch_size": batch_size, "model": model, "micro": micro,
                       "steps": steps})
    done = subprocess.run([sys.executable, "-m", "mlx_clip.benchmarks.memory", "--worker", spec], capture_output=True,
                          text=True, timeout=1800)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(out: str | Path, *, model: str = "small", batches=(16, 64, 256, 1024), micro: int = 64, steps: int = 2,
        engines=("mlx", "torch"), echo=print) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for engine in engines:
        for mode in MODES:
            for batch in batches:
                if mode == "cached" and batch <= micro:
                    continue  # a cached step at or under its micro-batch is a plain step
                if mode != "cached" and batch > max(64, micro) * 4:
                    continue  # what caching exists to avoid; it would only measure swapping
                echo(f"{engine} {mode} batch {batch} ...")
                rows.append({"engine": engine, "mode": mode, "batch": batch,
                             **measure(engine, mode, batch, model, micro, steps)})
    ratios = {}
    for engine in engines:
        plain64 = next((r for r in rows if (r["engine"], r["mode"], r["batch"]) == (engine, "plain", 64)
                        and "step_bytes" in r), None)
        cached = next((r for r in rows if (r["engine"], r["mode"], r["batch"]) == (engine, "cached", max(batches))
                       and "step_bytes" in r), None)
        if plain64 and cached:
            ratios[engine] = cached["step_bytes"] / plain64["step_bytes"]
    results = {"model": model, "micro_batch_size": micro, "rows": rows, "cached_vs_plain64": ratios}
    (out / "memory.json").write_text(json.dumps(results, indent=2))
    lines = [f"# Training-step memory vs batch size — {model}, micro-batch {micro}", "",
             "| engine | step | batch | step memory (MiB) | images/s | loss |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['engine']} | {r['mode']} | {r['batch']} | failed: {r['error'][:60]} | | |")
        else:
            lines.append(f"| {r['engine']} | {r['mode']} | {r['batch']} | {r['step_bytes'] / 2 ** 20:.0f} | "
                         f"{r['images_per_s']:.1f} | {r['loss']:.4f} |")
    lines += ["", f"| feature-cached batch {max(batches)} / plain batch 64, step memory | ratio |", "|---|---|"]
    lines += [f"| {engine} | {ratio:.2f}x |" for engine, ratio in ratios.items()]
    (out / "memory.md").write_text("\n".join(lines) + "\n")
    _plot(rows, out / "memory.png")
    echo("\n".join(lines))
    return results


def _plot(rows: list[dict], path: Path) -> None:
    from mlx_clip.evaluation.figures import figure

    fig = figure(8, 4.5)
    ax = fig.subplots()
    for engine in sorted({r["engine"] for r in rows}):
        for mode, marker in zip(MODES, "osd"):
            points = [(r["batch"], r["step_bytes"] / 2 ** 20) for r in rows
                      if r["engine"] == engine and r["mode"] == mode and "step_bytes" in r]
            if points:
                ax.plot(*zip(*points), marker=marker, label=f"{engine} {mode}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("step memory (MiB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/memory")
    parser.add_argument("--model", default="small")
    parser.add_argument("--batches", default="16,64,256,1024")
    parser.add_argument("--micro", type=int, default=64)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    run(args.out, model=args.model, batches=tuple(int(b) for b in args.batches.split(",")), micro=args.micro)


if __name__ == "__main__":
    main()
