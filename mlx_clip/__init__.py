"""mlxclip: fine-tune CLIP on your own domain, in MLX and PyTorch."""

from mlx_clip.blas import load_optimized_blas

# The one module-level side effect we allow: MLX must see an optimized BLAS before it first runs a
# matmul, and every entry point (CLI, Python API, tests) imports this package first.
load_optimized_blas()

__version__ = "0.1.0"


def load(model, backend: str = "mlx", **kwargs):
    """Load a CLIP (folder, built-in name or hub id) with an engine; see `mlx_clip.api.load`."""
    from mlx_clip.api import load as _load

    return _load(model, backend, **kwargs)
