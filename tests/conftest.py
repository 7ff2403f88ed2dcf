"""Shared fixtures. `import mlx_clip` first: it loads the optimized BLAS before mlx is imported."""

import mlx_clip  # noqa: F401  (side effect: BLAS loader)

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(0)
