"""Float32 matmul throughput of MLX with the BLAS loader, of numpy, and of MLX's reference BLAS.

    python -m mlx_clip.benchmarks.blas_candidates [--sizes 512 1024 2048] [--reps 7] [--out benchmarks/results/blas.json]

MLX's Linux wheel links the reference BLAS; `mlx_clip.engine.blas` swaps in an optimized one. This shows
what that buys: GFLOP/s (2 n^3 per n x n matmul, median of `--reps` timed runs after warm-up) for
MLX and numpy at each size, and for MLX with the loader disabled (`MLXCLIP_BLAS=none`, which only
takes effect in a fresh process, so it runs in a subprocess, at one size and a few reps: it is slow).
"""

from __future__ import annotations

import mlx_clip  # noqa: F401  (loads the optimized BLAS before mlx is imported)

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

from mlx_clip.engine.base import median_seconds

DEFAULT_OUT = Path("benchmarks/results/blas.json")


def gflops(n: int, seconds: float) -> float:
    return 2 * n ** 3 / seconds / 1e9


def operands(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32))


def measure_mlx(n: int, reps: int, warmup: int) -> dict:
    import mlx.core as mx

    a_np, b_np = operands(n)
    a, b = mx.array(a_np), mx.array(b_np)
    mx.eval(a, b)
    seconds = median_seconds(lambda: mx.eval(a @ b), reps, warmup)
    # A fast wrong answer is no result: check against numpy (float64) before reporting.
    exact = a_np.astype(np.float64) @ b_np.astype(np.float64)
    got = np.array(a @ b).astype(np.float64)
    rel = float(np.linalg.norm(got - exact) / np.linalg.norm(exact))
    return {"size": n, "seconds": seconds, "gflops": gflops(n, seconds), "rel_err_vs_float64": rel}


def measure_numpy(n: int, reps: int, warmup: int) -> dict:
    a, b = operands(n)
    seconds = median_seconds(lambda: a @ b, reps, warmup)
    return {"size": n, "seconds": seconds, "gflops": gflops(n, seconds)}


def measure_reference(n: int, reps: int, warmup: int) -> dict:
    """MLX on its own reference BLAS: a fresh interpreter with the loader disabled."""
    env = {**os.environ, "MLXCLIP_BLAS": "none"}
    cmd = [sys.executable, "-m", "mlx_clip.benchmarks.blas_candidates", "--worker", "--sizes", str(n), "--reps", str(reps),
           "--warmup", str(warmup)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout)
    if result["blas"]["path"] is not None:
        raise RuntimeError(f"MLXCLIP_BLAS=none did not disable the loader: {result['blas']}")
    return result["mlx"][0]


def blas_record() -> dict:
    from mlx_clip.engine.blas import blas_info

    choice = blas_info()
    return {"name": choice.name, "path": choice.path}


def numpy_blas() -> str:
    try:
        config = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version', '')}".strip()
    except (TypeError, KeyError):  # numpy < 1.25 has no dict mode
        return "unknown"


def environment() -> dict:
    import mlx.core as mx

    threads = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                          "OPENBLAS_CORETYPE") if k in os.environ}
    return {"python": platform.python_version(), "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "mlx": mx.__version__, "numpy": np.__version__,
            "numpy_blas": numpy_blas(), "thread_env": threads}


def run(sizes: list[int], reps: int, warmup: int, ref_size: int, ref_reps: int) -> dict:
    rows = []
    for n in sizes:
        mlx_row, np_row = measure_mlx(n, reps, warmup), measure_numpy(n, reps, warmup)
        rows.append({"size": n, "mlx": mlx_row, "numpy": np_row, "mlx_over_numpy": mlx_row["gflops"] / np_row["gflops"]})
    reference = measure_reference(ref_size, ref_reps, 1)
    loaded = next((r["mlx"] for r in rows if r["size"] == ref_size), None) or measure_mlx(ref_size, reps, warmup)
    return {
        "blas": blas_record(), "environment": environment(), "reps": reps, "warmup": warmup, "rows": rows,
        "reference": {**reference, "reps": ref_reps, "loader_speedup": loaded["gflops"] / reference["gflops"]},
    }


def table(result: dict) -> str:
    lines = [f"MLX BLAS: {result['blas']['name']} ({result['blas']['path']}); numpy BLAS: "
             f"{result['environment']['numpy_blas']}; {result['environment']['cpu_count']} CPUs",
             f"float32 matmul, GFLOP/s, median of {result['reps']} runs after {result['warmup']} warm-up",
             f"{'size':>6} {'mlx':>10} {'numpy':>10} {'mlx/numpy':>10}"]
    for row in result["rows"]:
        lines.append(f"{row['size']:>6} {row['mlx']['gflops']:>10.1f} {row['numpy']['gflops']:>10.1f} "
                     f"{row['mlx_over_numpy']:>10.2f}")
    ref = result["reference"]
    lines.append(f"MLX reference BLAS (MLXCLIP_BLAS=none), n={ref['size']}, median of {ref['reps']}: "
                 f"{ref['gflops']:.2f} GFLOP/s; the loader is {ref['loader_speedup']:.1f}x faster")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ref-size", type=int, default=1024, help="size for the reference-BLAS run")
    parser.add_argument("--ref-reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:  # the reference-BLAS subprocess: MLX only, JSON on stdout
        print(json.dumps({"blas": blas_record(), "mlx": [measure_mlx(n, args.reps, args.warmup) for n in args.sizes]}))
        return
    result = run(args.sizes, args.reps, args.warmup, args.ref_size, args.ref_reps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
