"""`convert(src, dst, to=..., verify=...)`: exact conversion with verify-before-write.

The result is written to a hidden sibling of `dst`, handed to `verify` next to the source, and
renamed into place only when `verify` accepts it; on any failure `dst` is untouched. Without
`dtype` every tensor keeps its dtype and bytes.

Verifying needs an engine to embed with, and engines stand above the converters, so the verifier
is passed in: `mlx_clip.conversion.convert` is this function with the engines' check.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from mlx_clip.convert import detect
from mlx_clip.convert.checkpoint import quantization_of, quantized_refusal, read_stored
from mlx_clip.convert.dtypes import cast, check_dtype
from mlx_clip.convert.open_clip_config import preprocess_cfg_from_hf
from mlx_clip.convert.writer import (copy_side_files, open_clip_crops, open_clip_normalisation, write_preprocessor_config,
                            write_stored)
from mlx_clip.errors import ConvertError
from mlx_clip.outputs import move_into_place, overlap, staging_folder

# (source folder, staged result folder, target format, whether any side holds float16/bfloat16)
# -> None, or ConvertError when the result does not behave like the source.
Verifier = Callable[[Path, Path, str, bool], None]
# A last step on the staged folder, before it is verified: MLX's quantization, which needs the
# engine (`mlx_clip.conversion` passes it).
Finisher = Callable[[Path], None]


def convert(src: str | Path, dst: str | Path, *, to: str, verify: Verifier | None, dtype: str | None = None,
            allow_pickle: bool = False, overwrite: bool = False, finish: Finisher | None = None) -> Path:
    """Convert the checkpoint folder `src` (any supported format) into `dst` as `to`
    ("mlx" | "hf" | "open_clip"), optionally casting floats to `dtype`. Returns `dst`.
    `verify=None` writes without checking."""
    if to not in detect.FORMATS:
        raise ConvertError(f"--to must be one of {', '.join(detect.FORMATS)}, got {to!r}")
    if dtype is not None:
        check_dtype(dtype)
    src, dst = Path(src), Path(dst)
    check_destination(src, dst, overwrite)
    quantization = quantization_of(src)
    if quantization is not None:
        raise ConvertError(quantized_refusal(src, quantization, f"--to {to} needs float weights, and dequantized "
                                             "ones are not the weights they were quantized from"))
    stored = read_stored(src, allow_pickle=allow_pickle)
    tensors = {n: cast(t, dtype) for n, t in stored.tensors.items()}
    extras = {n: cast(t, dtype) for n, t in stored.extra_tensors.items()}
    reduced = any(t.dtype in ("F16", "BF16") for t in [*tensors.values(), *stored.tensors.values()])
    staging = staging_folder(dst)
    try:
        config = stored.config
        write_stored(staging, to, config, tensors, extras,
                     preprocess_cfg=preprocess_cfg_from_hf(src, siglip=config.is_siglip))
        copied = copy_side_files(src, staging)
        normalisation = open_clip_normalisation(config)
        if to != "open_clip" and "preprocessor_config.json" not in copied and normalisation:
            write_preprocessor_config(staging, config.vision_config.image_size,
                                      siglip=config.is_siglip and not open_clip_crops(config), **normalisation)
        if finish is not None:
            finish(staging)
        if verify is not None:
            try:
                verify(src, staging, to, reduced)
            except ConvertError as err:
                raise ConvertError(f"{src} -> {dst}: {err}; {dst} left untouched") from None
        move_into_place(staging, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dst


def check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """ConvertError unless `dst` may receive a result made from `src`: absent, empty, or (with
    `overwrite`) a non-empty folder; never the source, a folder holding it or one inside it, which
    replacing `dst` would delete or the result would mix into."""
    if dst.exists() and not dst.is_dir():
        raise ConvertError(f"{dst}: destination exists and is not a folder")
    relation = overlap(dst, src) if src.exists() else None
    if relation:
        raise ConvertError(f"{dst}: destination {relation} the source folder {src}; choose a folder apart from it "
                           "(--overwrite never removes the source)")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise ConvertError(f"{dst}: destination folder is not empty; pass overwrite=True (--overwrite) "
                           "to replace it")


