"""`mlxclip convert`: the converters of `convert/` with verify-before-write by the engines.

The converted folder is embedded next to the source on one seeded random batch — torch reads the
source (the reference engine), the engine that will use the result reads the result — and kept
only when the embeddings agree.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np

from mlx_clip.convert import converter
from mlx_clip.data.synthetic import synthetic_inputs
from mlx_clip.engine.protocol import load_backend
from mlx_clip.model.config import CLIPConfig, check_quantize
from mlx_clip.errors import ConvertError

FLOAT32_TOLERANCE = 1e-4  # max |a - b| between L2-normalised embeddings
REDUCED_MIN_COSINE = 0.99  # per row, when any side holds float16 / bfloat16 weights
# Per row, quantized result against the float source, by bits: quantization moves embeddings far
# more than float rounding does, while a wrong name or layout still gives cosines near 0. Lowest
# measured on the built-in random models (tiny, small, siglip-tiny, vit-b32; 2 to 16 rows): 8-bit
# 0.99979, 4-bit 0.928 (text towers; image towers 0.959 and above).
QUANTIZED_MIN_COSINE = {8: 0.99, 4: 0.8}
VERIFY_BATCH = 2
VERIFY_SEED = 0


def convert(src: str | Path, dst: str | Path, *, to: str, dtype: str | None = None, allow_pickle: bool = False,
            verify: bool = True, overwrite: bool = False, quantize: int | None = None) -> Path:
    """Convert the checkpoint folder `src` (any supported format) into `dst` as `to`
    ("mlx" | "hf" | "open_clip"), optionally casting floats to `dtype`; with `quantize` (8 or 4,
    `to="mlx"` only) the Linears quantized as the MLX engine's `--quantize` does, and the folder
    then loads quantized. Verified unless `verify=False`. Returns `dst`."""
    check_quantize(quantize)
    if quantize is not None and to != "mlx":
        raise ConvertError(f"--quantize {quantize} writes MLX's quantized layout, which --to {to} cannot hold "
                           "(transformers and open_clip read float weights): use --to mlx, or drop --quantize")
    verifier = functools.partial(verify_conversion, allow_pickle=allow_pickle, quantize=quantize) if verify else None
    return converter.convert(src, dst, to=to, verify=verifier, dtype=dtype, allow_pickle=allow_pickle,
                             overwrite=overwrite, finish=None if quantize is None else functools.partial(
                                 quantize_folder, bits=quantize))


def quantize_folder(folder: Path, bits: int) -> None:
    """Rewrite the float MLX folder `folder` with its Linears quantized to `bits`, through the
    engine that runs them (its weights and config.json replaced; side files kept)."""
    load_backend("mlx", folder, quantize=bits).save(folder, to="mlx")


def verify_batch(config: CLIPConfig, batch: int = VERIFY_BATCH, seed: int = VERIFY_SEED,
                 length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The seeded inputs both sides of a conversion or an export embed (`data.synthetic`)."""
    return synthetic_inputs(config, batch, seed, length)


def verify_backends(to: str) -> tuple[str, str]:
    """torch reads the source (the reference engine); the result is read by the engine that will
    use it. Where only one framework is installed, that one does both."""
    has_torch = importlib.util.find_spec("torch") is not None
    has_mlx = importlib.util.find_spec("mlx") is not None
    source = "torch" if has_torch else "mlx"
    result = "mlx" if (to == "mlx" and has_mlx) or not has_torch else "torch"
    return source, result


def verify_conversion(src: Path, out: Path, to: str, reduced: bool, *, allow_pickle: bool = False,
                      quantize: int | None = None) -> None:
    """Embed one seeded batch with the source and the result (engines from `verify_backends`);
    ConvertError unless they agree (for a `quantize`d result: to QUANTIZED_MIN_COSINE)."""
    source_backend, result_backend = verify_backends(to)
    # Engines only: the batch is token ids, so no tokenizer is read (an open_clip SigLIP folder
    # has none of its own, and its converted folder then has no tokenizer.json either).
    source = load_backend(source_backend, src, allow_pickle=allow_pickle)
    result = load_backend(result_backend, out)
    pixels, ids = verify_batch(source.config)
    for kind, a, b in (("image", source.encode_images(pixels), result.encode_images(pixels)),
                       ("text", source.encode_texts(ids), result.encode_texts(ids))):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape:
            raise ConvertError(f"verification failed: {kind} embeddings have shape {b.shape}, source {a.shape}")
        if reduced or quantize is not None:
            bound = REDUCED_MIN_COSINE if quantize is None else min(QUANTIZED_MIN_COSINE[quantize],
                                                                    REDUCED_MIN_COSINE if reduced else 1.0)
            cosine = float(np.min(np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))
            if not cosine >= bound:
                raise ConvertError(f"verification failed: {kind} embeddings of the converted model have cosine "
                                   f"{cosine:.4f} to the source's (need >= {bound})")
        else:
            diff = float(np.max(np.abs(a - b)))
            if not diff <= FLOAT32_TOLERANCE:
                raise ConvertError(f"verification failed: {kind} embeddings differ by {diff:.2e} from the "
                                   f"source's (tolerance {FLOAT32_TOLERANCE:.0e})")
