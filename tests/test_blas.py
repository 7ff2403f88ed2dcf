"""The BLAS loader, each case in a fresh interpreter (the loader acts once, before mlx is imported).

What MLX really calls is read from the dynamic linker itself: with `LD_DEBUG=bindings`, glibc logs
which library each of libmlx.so's `cblas_sgemm` references was bound to. Results are held to numpy's
float32 matmul (its own OpenBLAS) within float32 rounding: relative Frobenius error 1e-5 at 512x512
(the summation order differs between BLAS libraries; measured ~1e-7).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MATMUL_TOL = 1e-5
BINDING = re.compile(r"binding file \S*/libmlx\.so \[\d+\] to (\S+) \[\d+\]: normal symbol `cblas_sgemm'")

MATMUL = """
import json, os, sys
before = os.environ.get("OPENBLAS_CORETYPE")
import mlx_clip
from mlx_clip.engine.blas import blas_info
import mlx.core as mx
import numpy as np

n = int(sys.argv[1])
rng = np.random.default_rng(0)
a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
got = np.array(mx.array(a) @ mx.array(b))
want = a @ b
info = blas_info()
print(json.dumps({"name": info.name, "path": info.path, "coretype_before": before,
                  "coretype_after": os.environ.get("OPENBLAS_CORETYPE"),
                  "rel_err": float(np.linalg.norm(got - want) / np.linalg.norm(want))}))
"""

WARNINGS = """
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import mlx_clip
from mlx_clip.engine.blas import blas_info
info = blas_info()
print(json.dumps({"name": info.name, "path": info.path,
                  "warnings": [[w.category.__name__, str(w.message)] for w in caught]}))
"""

# Imported with the loader disabled (nothing gets loaded), then run again as if no BLAS existed.
NOTHING_FOUND = """
import json, os, warnings
import mlx_clip.engine.blas as blas
os.environ.pop("MLXCLIP_BLAS")
os.environ.update(dict(arg.split("=", 1) for arg in __import__("sys").argv[1:]))
blas._choice = None
for finder in ("_ngsolve_openblas", "_system_openblas", "_mkl"):
    setattr(blas, finder, lambda: [])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    info = blas.load_optimized_blas()
print(json.dumps({"name": info.name, "path": info.path,
                  "warnings": [[w.category.__name__, str(w.message)] for w in caught]}))
"""


def python(code: str, *args: str, env: dict[str, str] | None = None, bindings: bool = False):
    """Run `code` in a fresh interpreter; (its JSON answer, the path libmlx's cblas_sgemm bound to)."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("MLXCLIP_BLAS", "LD_DEBUG")}
    full_env.update(env or {})
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), full_env.get("PYTHONPATH", "")])
    if bindings:
        full_env["LD_DEBUG"] = "bindings"
    proc = subprocess.run([sys.executable, "-c", code, *args], env=full_env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bound = BINDING.findall(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1]), (bound[-1] if bound else None)


@pytest.fixture(scope="module")
def default_run():
    return python(MATMUL, "512", bindings=True)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the loader acts on Linux only")
def test_optimized_blas_is_what_mlx_calls_and_it_is_right(default_run):
    info, bound = default_run
    assert info["path"] is not None and not info["name"].startswith("reference"), info
    assert bound is not None and os.path.realpath(bound) == os.path.realpath(info["path"])
    assert info["rel_err"] <= MATMUL_TOL
    # The loader never sets or changes it: a machine that sets it does so for its CPU.
    assert info["coretype_after"] == info["coretype_before"] == os.environ.get("OPENBLAS_CORETYPE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the loader acts on Linux only")
def test_none_disables_the_loader(default_run):
    info, bound = python(MATMUL, "256", env={"MLXCLIP_BLAS": "none"}, bindings=True)
    assert info["path"] is None and info["name"] == "reference (disabled by MLXCLIP_BLAS=none)"
    # MLX keeps the reference BLAS its wheel ships (and it is still right, only slow).
    assert bound is not None and "mlx_cpu.libs" in bound
    assert os.path.realpath(bound) != os.path.realpath(default_run[0]["path"])
    assert info["rel_err"] <= MATMUL_TOL


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the loader acts on Linux only")
def test_unloadable_path_warns_and_falls_back_to_the_search(default_run):
    info, bound = python(WARNINGS, env={"MLXCLIP_BLAS": "/nonexistent.so"}, bindings=True)
    assert [w[0] for w in info["warnings"]] == ["RuntimeWarning"]
    message = info["warnings"][0][1]
    assert "MLXCLIP_BLAS=/nonexistent.so could not be loaded" in message and "\n" not in message
    fallback = default_run[0]
    assert info["path"] == fallback["path"] and f"using {fallback['name']} ({fallback['path']}) instead" in message


@pytest.mark.parametrize("env,opening", [
    ({}, "mlxclip: no optimized BLAS found for MLX on Linux, so MLX uses its reference BLAS"),
    ({"MLXCLIP_BLAS": "/nonexistent.so"}, "mlxclip: MLXCLIP_BLAS=/nonexistent.so could not be loaded"),
])
def test_no_blas_found_warning_states_the_cost(env, opening):
    args = [f"{k}={v}" for k, v in env.items()]
    info, _ = python(NOTHING_FOUND, *args, env={"MLXCLIP_BLAS": "none"})
    assert info["name"] == "reference" and info["path"] is None
    assert [w[0] for w in info["warnings"]] == ["RuntimeWarning"]
    message = info["warnings"][0][1]
    assert message.startswith(opening) and "float32 matmuls run ~25x slower" in message


def test_benchmark_script_runs_and_reports_consistent_numbers(tmp_path):
    from mlx_clip.benchmarks.blas_candidates import main

    out = tmp_path / "results" / "blas.json"
    main(["--sizes", "64", "96", "--reps", "2", "--warmup", "1", "--ref-size", "64", "--ref-reps", "1",
          "--out", str(out)])
    result = json.loads(out.read_text())
    assert [row["size"] for row in result["rows"]] == [64, 96]
    for row in result["rows"] + [{"mlx": result["reference"], "size": 64}]:
        n, mlx_row = row["size"], row["mlx"]
        assert mlx_row["gflops"] == pytest.approx(2 * n ** 3 / mlx_row["seconds"] / 1e9)
        assert mlx_row["rel_err_vs_float64"] <= MATMUL_TOL
    for row in result["rows"]:
        assert row["mlx_over_numpy"] == pytest.approx(row["mlx"]["gflops"] / row["numpy"]["gflops"])
    # The speedup is the loaded MLX row at the reference size over the reference-BLAS run.
    loaded = next(row["mlx"] for row in result["rows"] if row["size"] == 64)
    assert result["reference"]["size"] == 64
    assert result["reference"]["loader_speedup"] == pytest.approx(loaded["gflops"] / result["reference"]["gflops"])
    assert np.isfinite(result["reference"]["gflops"])
