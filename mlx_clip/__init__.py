"""mlxclip: fine-tune CLIP on your own domain, in MLX and PyTorch."""

from mlx_clip.blas import load_optimized_blas

# The one module-level side effect we allow: MLX must see an optimized BLAS before it first runs a
# matmul, and every entry point (CLI, Python API, tests) imports this package first.
load_optimized_blas()

__version__ = "0.1.0"
