"""`mlxclip env`: what a bug report or a benchmark needs to say about the machine.

OS, CPU model and the instruction sets that decide speed here (AVX2, AVX-512, bf16, AMX),
accelerators, package versions, the BLAS MLX runs on (and why the others were not taken) with its
measured float32 GFLOP/s, the OpenBLAS variables that change numpy's speed, and the git commit.
Framework facts come from the engines through `mlx_clip.engine.protocol`; nothing here imports mlx or torch.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from mlx_clip.engine.protocol import describe_engines, engine_class
from mlx_clip.engine.blas import blas_info

CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "neon", "asimd")
PACKAGES = ("mlxclip", "mlx", "torch", "transformers", "open_clip_torch", "numpy", "safetensors", "tokenizers")
# Variables that change speed or behaviour: the BLAS and thread settings, and every MLXCLIP_*
# variable (the README's table lists what each does).
THREAD_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                    "OPENBLAS_NUM_THREADS")
MLXCLIP_VARIABLES = ("MLXCLIP_BLAS", "MLXCLIP_CPU_STREAMS", "MLXCLIP_JIT_FLAGS", "MLXCLIP_CACHE",
                     "MLXCLIP_COLLECTIVE_TIMEOUT", "MLXCLIP_API_KEY")


def cpu() -> dict[str, Any]:
    """Model name and the speed-relevant flags, from /proc/cpuinfo (Linux) or sysctl (macOS)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags.update(value.split())
    except OSError:
        try:
            model = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                   timeout=5).stdout.strip() or model
        except (OSError, subprocess.SubprocessError):
            pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model, "cores": cores, "flags": [f for f in CPU_FLAGS if f in flags]}


def memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(folder: Path | None = None) -> str | None:
    folder = folder or Path(__file__).resolve().parent
    try:
        proc = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def mlx_matmul_gflops(size: int = 1024) -> float | None:
    try:
        return engine_class("mlx").matmul_gflops(size)
    except ImportError:
        return None


def report(measure: bool = True) -> dict[str, Any]:
    choice = blas_info()
    return {
        "os": f"{platform.system()} {platform.release()}", "platform": platform.platform(),
        "python": platform.python_version(), "cpu": cpu(), "memory_bytes": memory_bytes(),
        "engines": describe_engines(), "versions": versions(),
        "mlx_blas": {"name": choice.name, "path": choice.path, "passed_by": choice.reason,
                     "float32_gflops_1024": mlx_matmul_gflops() if measure else None},
        "environment": {k: ("(set)" if k == "MLXCLIP_API_KEY" else os.environ[k])
                        for k in (*THREAD_VARIABLES, *MLXCLIP_VARIABLES) if k in os.environ},
        "git_commit": git_commit(),
    }


def format_report(data: dict[str, Any]) -> str:
    """The block to paste into an issue."""
    cpu_info = data["cpu"]
    blas = data["mlx_blas"]
    gflops = f", {blas['float32_gflops_1024']:.0f} GFLOP/s (float32, n=1024)" if blas["float32_gflops_1024"] else ""
    lines = [
        f"mlxclip {data['versions']['mlxclip']}  (git {data['git_commit'] or 'unknown'})",
        f"OS        {data['platform']}; Python {data['python']}",
        f"CPU       {cpu_info['model']}, {cpu_info['cores']} cores; {' '.join(cpu_info['flags']) or 'no listed flags'}",
        f"memory    {data['memory_bytes'] / 2 ** 30:.1f} GiB" if data["memory_bytes"] else "memory    unknown",
        *[f"engine    {line}" for line in data["engines"]],
        f"MLX BLAS  {blas['name']}" + (f" ({blas['path']})" if blas["path"] else "") + gflops,
    ]
    if blas["passed_by"]:
        lines.append(f"          passed by: {blas['passed_by']}")
    lines.append("versions  " + ", ".join(f"{k} {v}" for k, v in data["versions"].items() if v))
    lines.append("env       " + (", ".join(f"{k}={v}" for k, v in data["environment"].items()) or "(none set)"))
    return "\n".join(lines)
