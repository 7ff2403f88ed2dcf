"""Shared fixtures. `import mlx_clip` first: it loads the optimized BLAS before mlx is imported."""

import os
import shutil
import tempfile

import mlx_clip  # noqa: F401  (side effect: BLAS loader)

import numpy as np
import pytest

# Built-in models and the demo domain are generated into a cache; tests use their own, so they never
# depend on (or write to) the user's ~/.cache/mlxclip.
# The folder is made here, not in a hook, because test modules read the variable when imported.
_OWN_CACHE = None
if "MLXCLIP_CACHE" not in os.environ:
    _OWN_CACHE = os.environ["MLXCLIP_CACHE"] = tempfile.mkdtemp(prefix="mlxclip-test-cache-")


def pytest_unconfigure(config):
    # About 650 MB of built-in models and demo data per run; left behind, runs pile up on the disk.
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
