"""Whatever BLAS the loader picks for MLX, torch, numpy and scipy keep working in the same process.

Each case runs in a fresh interpreter: `import mlx_clip` (the loader acts), then torch's matmul,
bmm, conv2d and scaled-dot-product attention, numpy's matmul and scipy's solve, each held to a
float64 numpy reference (relative error 1e-4: float32 sums of a few hundred terms; measured ~1e-7).

The libgfortran5 path is exercised without touching the system: numpy's wheel vendors a
libgfortran, and a folder on LD_LIBRARY_PATH that names it `libgfortran.so.5` lets
`ngsolve-openblas` load, as it does on machines with the system library.
"""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4

WORKLOAD = """
import json, sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import mlx_clip
from mlx_clip.engine.blas import blas_info
import numpy as np, scipy.linalg, torch
import torch.nn.functional as F

rng = np.random.default_rng(0)
def rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))
a = rng.standard_normal((64, 96)).astype(np.float32); b = rng.standard_normal((96, 80)).astype(np.float32)
q = rng.standard_normal((4, 2, 50, 16)).astype(np.float32)
x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32); w = rng.standard_normal((5, 3, 4, 4)).astype(np.float32)
qd = q.astype(np.float64)
scores = qd @ qd.swapaxes(-1, -2) / 4.0
weights = np.exp(scores - scores.max(-1, keepdims=True)); weights /= weights.sum(-1, keepdims=True)
errors = {
    "torch.matmul": rel(torch.from_numpy(a) @ torch.from_numpy(b), a.astype(np.float64) @ b),
    "torch.bmm": rel(torch.bmm(torch.from_numpy(q[0]), torch.from_numpy(q[0]).transpose(1, 2)),
                     qd[0] @ qd[0].swapaxes(-1, -2)),
    "torch.sdpa": rel(F.scaled_dot_product_attention(*(torch.from_numpy(q),) * 3), weights @ qd),
    "numpy.matmul": rel(a @ b, a.astype(np.float64) @ b),
    "scipy.solve": rel(scipy.linalg.solve(a[:, :64] @ a[:, :64].T + 64 * np.eye(64, dtype=np.float32), a[:, 0]),
                       np.linalg.solve((a[:, :64] @ a[:, :64].T).astype(np.float64) + 64 * np.eye(64), a[:, 0])),
}
patches = x.reshape(2, 3, 4, 4, 4, 4).transpose(0, 2, 4, 1, 3, 5).reshape(2, 4, 4, 48).astype(np.float64)
errors["torch.conv2d"] = rel(F.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=4),
                             (patches @ w.reshape(5, 48).T.astype(np.float64)).transpose(0, 3, 1, 2))
import mlx.core as mx
errors["mlx.matmul"] = rel(mx.array(a) @ mx.array(b), a.astype(np.float64) @ b)
info = blas_info()
print(json.dumps({"name": info.name, "path": info.path, "reason": info.reason, "errors": errors,
                  "warnings": [str(w.message) for w in caught]}))
"""

# The hazard the loader guards against, shown by loading the library anyway.
UNGUARDED = """
import ctypes, sys
ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)
import torch
b = torch.randn(4, 50, 64)
torch.bmm(b, b.transpose(1, 2))
print("survived")
"""


def run(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("MLXCLIP_BLAS", "LD_LIBRARY_PATH")}
    full_env.update(env or {})
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), full_env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code, *args], env=full_env, cwd=ROOT, capture_output=True,
                          text=True, timeout=180)


def workload(env: dict | None = None) -> dict:
    proc = run(WORKLOAD, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, error in result["errors"].items():
        assert error <= TOL, (name, error, result["name"])
    return result


@pytest.fixture(scope="module")
def gfortran_dir(tmp_path_factory) -> Path:
    """A folder that gives `ngsolve-openblas` the libgfortran5 it needs, from numpy's wheel."""
    libs = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    gfortran = sorted(libs.glob("libgfortran-*.so.5*"))
    if not gfortran:
        pytest.skip("this numpy wheel vendors no libgfortran")
    folder = tmp_path_factory.mktemp("gfortran")
    (folder / "libgfortran.so.5").symlink_to(gfortran[0])
    for lib in libs.glob("libquadmath-*"):  # libgfortran needs it under its vendored name
        (folder / lib.name).symlink_to(lib)
    return folder


def ngsolve_library() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("ngsolve_openblas")
    found = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "libopenblas*.so*"))) if spec else []
    return found[0] if found else None


def test_default_candidate_keeps_every_library_working():
    result = workload()
    assert result["name"] != "reference"


def test_reference_blas_keeps_every_library_working():
    assert workload({"MLXCLIP_BLAS": "none"})["path"] is None


def test_with_libgfortran5_torch_still_works(gfortran_dir):
    """ngsolve-openblas loads on such a machine; the loader must see the conflict and pass it by."""
    library = ngsolve_library()
    if library is None:
        pytest.skip("ngsolve-openblas is not installed")
    result = workload({"LD_LIBRARY_PATH": str(gfortran_dir)})
    assert result["path"] != library
    assert "ngsolve-openblas" in result["reason"] and "cblas_sgemm_batch" in result["reason"]


def test_the_conflict_is_real_and_an_explicit_choice_is_refused_too(gfortran_dir):
    library = ngsolve_library()
    if library is None:
        pytest.skip("ngsolve-openblas is not installed")
    crashed = run(UNGUARDED, library, env={"LD_LIBRARY_PATH": str(gfortran_dir)})
    assert crashed.returncode != 0 and "survived" not in crashed.stdout  # SIGSEGV without the guard
    result = workload({"LD_LIBRARY_PATH": str(gfortran_dir), "MLXCLIP_BLAS": library})
    assert result["path"] != library
    assert any("MLXCLIP_BLAS" in w and "cblas_sgemm_batch" in w for w in result["warnings"])


def test_the_symbol_reader_agrees_with_the_dynamic_linker():
    """`exported_symbols` reads the ELF table without loading; ctypes' lookups are the reference."""
    import ctypes

    from mlx_clip.engine.blas import blas_info, exported_symbols

    path = blas_info().path
    if path is None:
        pytest.skip("no optimized BLAS loaded")
    names = exported_symbols(path)
    library = ctypes.CDLL(path)
    for name in ("cblas_sgemm", "sgemm_", "cblas_dgemm"):
        assert (name in names) == hasattr(library, name), name
    assert "certainly_not_a_blas_symbol" not in names
