"""Give MLX's Linux CPU build an optimized BLAS.

The ``mlx-cpu`` wheel for Linux links the reference BLAS: a float32 matmul runs ~25x slower than
the hardware allows. MLX calls the standard ``cblas_*`` symbols through lazy binding, so a BLAS
that exports them, loaded with ``RTLD_GLOBAL`` before ``mlx.core`` is first used, takes their place
for the whole process. This module is imported by ``mlx_clip/__init__.py`` and so runs before any
of our code imports mlx, for the CLI, the Python API and the tests alike.

Candidates, best first (each must load and export ``cblas_sgemm``):

1. ``MLXCLIP_BLAS`` = path to a shared library (or ``none`` to disable the loader); if it cannot be
   loaded, a warning says so and the search goes on with the candidates below;
2. ``ngsolve-openblas`` (PyPI): OpenBLAS built with DYNAMIC_ARCH, so it picks its kernels for the
   running CPU and never executes an instruction the CPU lacks; needs the system's libgfortran5;
3. the system's OpenBLAS (``libopenblas.so.0``, e.g. Debian's ``libopenblas0``);
4. Intel MKL from the ``mkl`` wheel (no Fortran runtime needed; dispatches on any x86_64 CPU).

A library loaded with ``RTLD_GLOBAL`` also answers every other library's lookups of the names it
exports. PyTorch's wheels carry MKL and call its *extensions* by name (``cblas_sgemm_batch`` for
``torch.bmm``); OpenBLAS 0.3.27 and later export functions of the same names with another calling
convention, and ``torch.bmm`` then dies with a segmentation fault. So a candidate other than MKL is
read first (its ELF dynamic symbol table, without loading it) and refused when it exports one of
those names; the reason is kept for ``mlxclip info``. Standard CBLAS/LAPACK names are shared by
every BLAS with one signature and are safe to interpose.

``OPENBLAS_CORETYPE`` is never touched: where a machine sets it, it does so for a reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import glob
import importlib.util
import os
import struct
import sys
import warnings
from dataclasses import dataclass

_ENV = "MLXCLIP_BLAS"
# What the reference BLAS costs: `python -m mlx_clip.benchmarks.blas_candidates` measured 14-27x at n=1024 on 2 shared cores.
SLOWDOWN = "float32 matmuls run ~25x slower (benchmarks/blas_candidates.py measures it)"


# MKL's BLAS extensions that PyTorch calls; OpenBLAS's functions of these names differ in ABI.
MKL_ONLY_ABI = ("cblas_sgemm_batch", "cblas_dgemm_batch", "cblas_cgemm_batch", "cblas_zgemm_batch",
                "cblas_sgemm_batch_strided", "cblas_dgemm_batch_strided", "sgemm_batch_", "dgemm_batch_")


@dataclass(frozen=True)
class BlasChoice:
    name: str
    path: str | None
    reason: str = ""  # why the candidates before this one were not taken


_choice: BlasChoice | None = None


def exported_symbols(path: str) -> set[str] | None:
    """Names of the functions and objects an ELF64 shared library defines in its dynamic symbol
    table, read from the file (nothing is loaded or run); None if it cannot be read."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:  # 64-bit little-endian only
        return None
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = set()
    for _name, kind, _flags, _addr, offset, size, link, _info, _align, entsize in sections:
        if kind != 11 or not entsize:  # SHT_DYNSYM
            continue
        strtab = sections[link][4]
        for start in range(offset, offset + size, entsize):
            name_at, info, _other, section_index = struct.unpack_from("<IBBH", data, start)
            if section_index and (info >> 4) in (1, 2):  # defined, STB_GLOBAL or STB_WEAK
                end = data.index(b"\0", strtab + name_at)
                names.add(data[strtab + name_at:end].decode("ascii", "replace"))
    return names


def abi_conflicts(path: str) -> list[str]:
    """MKL-extension names a library other than MKL exports with its own ABI (see the module
    docstring); MKL itself is recognised by its version query."""
    names = exported_symbols(path)
    if names is None or "mkl_get_version_string" in names:
        return []
    return [n for n in MKL_ONLY_ABI if n in names]


def _try_load(path: str, deps: tuple[str, ...] = ()) -> str | None:
    """Load `path` globally; return None on success or the reason it failed or was refused."""
    conflicts = abi_conflicts(path)
    if conflicts:
        return (f"{path} exports {', '.join(conflicts[:2])}, which PyTorch calls with MKL's signature "
                "(loading it would crash torch.bmm)")
    try:
        for dep in deps:
            ctypes.CDLL(dep, mode=ctypes.RTLD_GLOBAL)
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as err:
        return str(err)
    if not hasattr(lib, "cblas_sgemm"):
        return f"{path} does not export cblas_sgemm"
    return None


def _ngsolve_openblas() -> list[tuple[str, str, tuple[str, ...]]]:
    spec = importlib.util.find_spec("ngsolve_openblas")
    if spec is None or not spec.submodule_search_locations:
        return []
    paths = []
    for folder in spec.submodule_search_locations:
        paths += sorted(glob.glob(os.path.join(folder, "libopenblas*.so*")))
    return [("ngsolve-openblas", p, ()) for p in paths]


def _system_openblas() -> list[tuple[str, str, tuple[str, ...]]]:
    names = ["libopenblas.so.0", "libopenblas.so"]
    found = ctypes.util.find_library("openblas")
    if found:
        names.insert(0, found)
    return [("system OpenBLAS", n, ()) for n in dict.fromkeys(names)]


def _mkl() -> list[tuple[str, str, tuple[str, ...]]]:
    out = []
    for prefix in dict.fromkeys([sys.prefix, sys.base_prefix]):
        libdir = os.path.join(prefix, "lib")
        for rt in sorted(glob.glob(os.path.join(libdir, "libmkl_rt.so*"))):
            # mkl_rt's default threading layer is Intel OpenMP; without libiomp5 in the global
            # scope it silently falls back to one thread.
            iomp = os.path.join(libdir, "libiomp5.so")
            out.append(("MKL", rt, (iomp,) if os.path.exists(iomp) else ()))
    return out


def _first_loadable(candidates: list[tuple[str, str, tuple[str, ...]]]) -> tuple[BlasChoice | None, list[str]]:
    failures = []
    for name, path, deps in candidates:
        error = _try_load(path, deps)
        if error is None:
            return BlasChoice(name, path, "; ".join(failures)), failures
        failures.append(f"{name}: {error}")
    return None, failures


def load_optimized_blas() -> BlasChoice:
    """Load the best available BLAS once per process and return what was chosen."""
    global _choice
    if _choice is not None:
        return _choice
    if sys.platform != "linux":
        _choice = BlasChoice("platform default", None, "only MLX's Linux wheel needs this")
        return _choice
    requested = os.environ.get(_ENV, "").strip()
    if requested.lower() == "none":
        _choice = BlasChoice("reference (disabled by MLXCLIP_BLAS=none)", None)
        return _choice
    requested_error = None
    if requested:
        requested_error = _try_load(requested)
        if requested_error is None:
            _choice = BlasChoice(_ENV, requested)
            return _choice
    # A mistyped MLXCLIP_BLAS should not cost the speed-up the automatic search still finds.
    _choice, failures = _first_loadable(_ngsolve_openblas() + _system_openblas() + _mkl())
    if requested_error is not None:
        failures.insert(0, f"{_ENV}: {requested_error}")
        fallback = (f"using {_choice.name} ({_choice.path}) instead" if _choice is not None
                    else f"no other optimized BLAS was found, so MLX uses its reference BLAS: {SLOWDOWN}")
        warnings.warn(f"mlxclip: {_ENV}={requested} could not be loaded ({requested_error}); {fallback}.",
                      RuntimeWarning, stacklevel=2)
    elif _choice is None:
        warnings.warn(f"mlxclip: no optimized BLAS found for MLX on Linux, so MLX uses its reference BLAS: "
                      f"{SLOWDOWN}. Install libgfortran5 (for ngsolve-openblas) or libopenblas0, "
                      f"or point {_ENV} at a libopenblas.so.", RuntimeWarning, stacklevel=2)
    if _choice is None:
        _choice = BlasChoice("reference", None, "; ".join(failures))
    return _choice


def blas_info() -> BlasChoice:
    return load_optimized_blas()


# Thread-count controls of the BLAS libraries we load, by the names each exports.
_THREAD_CONTROLS = (("MKL_Set_Num_Threads", "MKL_Get_Max_Threads"),
                    ("openblas_set_num_threads", "openblas_get_num_threads"))


@functools.cache
def _thread_controls():
    choice = blas_info()
    if choice.path is None:
        return None
    library = ctypes.CDLL(choice.path)
    return next(((getattr(library, s), getattr(library, g)) for s, g in _THREAD_CONTROLS
                 if hasattr(library, s) and hasattr(library, g)), None)


@contextlib.contextmanager
def blas_threads(count: int):
    """Run the block with the loaded BLAS limited to `count` threads, then restore its setting.

    For MLX's CPU streams: when each stream works on its own slice of the batch, one BLAS thread
    per stream keeps the cores busy without oversubscribing them. The setting is process-wide
    (torch's matmuls go through the same library once it is loaded globally), hence the restore."""
    controls = _thread_controls()
    if controls is None:
        yield
        return
    set_threads, get_threads = controls
    previous = get_threads()
    set_threads(count)
    try:
        yield
    finally:
        set_threads(previous)
