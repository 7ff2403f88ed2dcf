"""mlxclip: fine-tune CLIP on your own domain, in MLX and PyTorch."""

from mlx_clip.engine.blas import load_optimized_blas
from mlx_clip.version import __version__  # noqa: F401

# The one module-level side effect we allow: MLX must see an optimized BLAS before it first runs a
# matmul, and every entry point (CLI, Python API, tests) imports this package first.
load_optimized_blas()


def load(model, backend: str = "mlx", **kwargs):
    """Load a CLIP (folder, built-in name or hub id) with an engine; see `mlx_clip.api.load`."""
    from mlx_clip.api import load as _load

    return _load(model, backend, **kwargs)


def convert(src, dst, *, to: str, **kwargs):
    """Convert a checkpoint folder to "mlx", "hf" or "open_clip", verified before it is written;
    see `mlx_clip.conversion.convert`."""
    from mlx_clip.conversion import convert as _convert

    return _convert(src, dst, to=to, **kwargs)
