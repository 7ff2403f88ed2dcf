"""The process-wide settings the MLX engine needs, in one place and once: the default device, the
CPU allocator's cache limit and the vector flags of MLX's kernel compiler. (The BLAS is loaded
earlier still, by `import mlx_clip`: MLX must see it before its first matmul.) `mlxclip env`
reports what this sets, through the engine's `describe()`."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from mlx_clip.mlx_backend import jit


@dataclass(frozen=True)
class Runtime:
    device: str
    cache_limit_bytes: int | None  # None: MLX's own
    jit_flags: bool  # MLX's CPU kernels built with the vector flags (jit.py)


_configured: Runtime | None = None


def configure(device: str = "cpu") -> Runtime:
    """Set MLX up for `device` ("cpu" | "gpu"); calling it again with the same device changes nothing."""
    global _configured
    if _configured is not None and _configured.device == device:
        return _configured
    mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
    cache_limit = None
    jit_flags = False
    if device == "cpu":
        # MLX's CPU allocator keeps only 32 MB of freed buffers (Metal keeps up to the memory
        # limit): every larger activation went back to the OS and came back as fresh pages,
        # faulted in and zeroed each step. Cache as Metal does.
        cache_limit = max(mx.get_memory_limit(), 32 << 20)
        mx.set_cache_limit(cache_limit)
        jit_flags = jit.enable_vectorized_kernels() is not None
    _configured = Runtime(device, cache_limit, jit_flags)
    return _configured


def describe() -> str:
    """What `configure` set, or would set on the CPU."""
    if _configured is None:
        flags = "on" if jit.applies() else "off"
        return f"not configured yet (CPU: cache limit = memory limit, kernel vector flags {flags})"
    limit = "MLX's" if _configured.cache_limit_bytes is None else f"{_configured.cache_limit_bytes >> 20} MB"
    return (f"device {_configured.device}, cache limit {limit}, kernel vector flags "
            f"{'on' if _configured.jit_flags else 'off'}")
