"""The installed package claims one import name, `mlx_clip`: the repository's convert/, torch_backend/
and benchmarks/ install inside it, so a user's own `convert` or `benchmarks` package (PyPI has
unrelated ones of both names) is neither shadowed nor shadows ours."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip` builds from the committed and working-tree files (not the repository's build/)."""
    source = tmp_path_factory.mktemp("source")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", *isolation, "-w", str(out),
                    str(source)], check=True, capture_output=True, text=True)
    return next(out.glob("mlxclip-*.whl"))


def test_the_wheel_has_one_top_level_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"mlx_clip"}
    for module in ("mlx_clip/convert/converter.py", "mlx_clip/torch_backend/backend.py",
                   "mlx_clip/benchmarks/worker.py", "mlx_clip/assets/bpe_simple_vocab_16e6.txt.gz",
                   "mlx_clip/serve/ui/index.html", "mlx_clip/serve/ui/app.js", "mlx_clip/serve/ui/style.css"):
        assert module in names


def test_installed_beside_a_package_named_convert_both_import(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, text=True)
    for name in ("convert", "benchmarks"):  # stand-ins for PyPI's packages of those names
        (site / name).mkdir()
        (site / name / "__init__.py").write_text(f"WHO = 'the user\\'s {name}'\n")
    script = ("import convert, benchmarks, mlx_clip, mlx_clip.convert.detect, mlx_clip.benchmarks.flops\n"
              "print(convert.WHO, benchmarks.WHO, mlx_clip.__file__, mlx_clip.convert.detect.__file__, sep='\\n')")
    # -I: the interpreter ignores PYTHONPATH and the working directory, so only --target and the
    # environment's own site-packages (mlx_clip's dependencies) are on the path; --target comes first.
    done = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r})\n" + script],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["the user's convert", "the user's benchmarks"]
    assert all(line.startswith(str(site / "mlx_clip")) for line in lines[2:]), lines
