"""Device selection: MPS > CUDA > CPU for torch, Metal GPU > CPU for MLX, explicit choices checked.

The availability flags stand in for hardware this machine may lack; the answers are compared with
`torch.device` values, and the machine's own answers with what torch and MLX report about it.
"""

import mlx_clip  # noqa: F401  (BLAS loader first)

import mlx.core as mx
import pytest
import torch
from click.testing import CliRunner

from mlx_clip.cli import main
from mlx_clip.errors import ConfigError
from mlx_clip.mlx_backend.backend import select_device as mlx_select
from mlx_clip.torch_backend.model import select_device

FLAGS = [(cuda, mps) for cuda in (False, True) for mps in (False, True)]


@pytest.mark.parametrize("cuda,mps", FLAGS)
def test_auto_prefers_mps_then_cuda_then_cpu(cuda, mps):
    expected = torch.device("mps" if mps else "cuda" if cuda else "cpu")
    for requested in (None, "auto", "AUTO"):
        assert select_device(requested, cuda_available=cuda, mps_available=mps) == expected


@pytest.mark.parametrize("cuda,mps", FLAGS)
def test_explicit_cpu_always_wins(cuda, mps):
    assert select_device("cpu", cuda_available=cuda, mps_available=mps) == torch.device("cpu")


def test_explicit_accelerators_when_available():
    assert select_device("cuda:1", cuda_available=True, mps_available=True) == torch.device("cuda", 1)
    assert select_device("cuda", cuda_available=True, mps_available=True) == torch.device("cuda")
    assert select_device("mps", cuda_available=True, mps_available=True) == torch.device("mps")


@pytest.mark.parametrize("requested,pattern", [
    ("cuda", r"^--device cuda: CUDA is not available"),
    ("cuda:1", r"^--device cuda:1: CUDA is not available"),
    ("mps", r"^--device mps: MPS is not available"),
])
def test_unavailable_accelerator_is_refused(requested, pattern):
    with pytest.raises(ConfigError, match=pattern):
        select_device(requested, cuda_available=False, mps_available=False)


@pytest.mark.parametrize("requested", ["gpu", "tpu", "metal", "cuda:x", "cuda:-1", "auto:1"])
def test_unknown_or_malformed_names_are_refused(requested):
    with pytest.raises(ConfigError) as info:
        select_device(requested, cuda_available=True, mps_available=True)
    assert requested in str(info.value) and "\n" not in str(info.value)


def test_this_machine_torch():
    expected = "mps" if torch.backends.mps.is_available() else "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device(None).type == expected


def test_mlx_selection():
    assert mlx_select("auto", gpu_available=True) == "gpu"
    assert mlx_select(None, gpu_available=False) == "cpu"
    assert mlx_select("cpu", gpu_available=True) == "cpu"
    for name in ("cuda", "mps", "gpu:1", "tpu"):
        with pytest.raises(ConfigError, match=r"--device must be one of auto, cpu, gpu"):
            mlx_select(name, gpu_available=True)


@pytest.mark.skipif(mx.metal.is_available(), reason="this MLX build has Metal")
def test_this_machine_mlx_has_no_gpu():
    assert mlx_select("auto") == "cpu" and mlx_select(None) == "cpu"
    with pytest.raises(ConfigError, match=r"^--device gpu: this MLX build has no GPU"):
        mlx_select("gpu")


@pytest.mark.skipif(torch.cuda.is_available() or mx.metal.is_available(), reason="needs a machine without GPUs")
@pytest.mark.parametrize("backend,device,message", [
    ("torch", "cuda", "error: --device cuda: CUDA is not available to this torch build"),
    ("mlx", "gpu", "error: --device gpu: this MLX build has no GPU (Metal is not available)"),
])
def test_cli_refuses_unavailable_device(backend, device, message, tmp_path):
    res = CliRunner().invoke(main, ["embed", "--model", "tiny", "--text", "a", "--out", str(tmp_path / "e.npz"),
                                    "--backend", backend, "--device", device])
    assert res.exit_code == 2 and res.stderr.splitlines() == [message], res.output


def test_env_reports_every_mlxclip_variable_the_code_reads(monkeypatch):
    """Each MLXCLIP_* variable read anywhere in the package is in `mlxclip env`'s report and in the
    README's table (two were undocumented); the API key's value is never printed."""
    import re
    from pathlib import Path

    from mlx_clip import environment

    root = Path(__file__).resolve().parents[1]
    read = set()
    for package in ("mlx_clip", "torch_backend", "convert"):
        for path in (root / package).rglob("*.py"):
            read |= set(re.findall(r"MLXCLIP_[A-Z_]+", path.read_text()))
    assert read - {"MLXCLIP_VARIABLES"} == set(environment.MLXCLIP_VARIABLES)
    readme = (root / "README.md").read_text()
    assert all(f"| `{name}` |" in readme for name in environment.MLXCLIP_VARIABLES)
    monkeypatch.setenv("MLXCLIP_API_KEY", "secret")
    assert environment.report(measure=False)["environment"]["MLXCLIP_API_KEY"] == "(set)"
