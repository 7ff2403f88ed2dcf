"""Shared fixtures. `import mlx_clip` first: it loads the optimized BLAS before mlx is imported."""

import os
import tempfile

import mlx_clip  # noqa: F401  (side effect: BLAS loader)

import numpy as np
import pytest

# Built-in models and the demo domain are generated into a cache; tests use their own, so they never
# depend on (or write to) the user's ~/.cache/mlxclip.
os.environ.setdefault("MLXCLIP_CACHE", tempfile.mkdtemp(prefix="mlxclip-test-cache-"))


@pytest.fixture
def rng():
    return np.random.default_rng(0)
