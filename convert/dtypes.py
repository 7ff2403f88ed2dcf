"""Float widening and narrowing on stored tensors.

Widening (bf16/f16 -> f32) is exact. Narrowing happens only when the user asks for a dtype, with
round-to-nearest-even as torch's `.to(torch.bfloat16)` and numpy's `astype(float16)` do.
"""

from __future__ import annotations

import numpy as np

from mlx_clip.convert.safetensors_io import FLOAT_TAGS, STORAGE, Tensor
from mlx_clip.errors import ConvertError
from mlx_clip.engine.policy import DTYPES

TAG_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
# The dtypes a user may ask for are the toolkit's one list; this is where each is stored.
DTYPE_TAGS = {name: tag for tag, name in TAG_NAMES.items() if name in DTYPES}


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bf16 is the top half of a float32: shifting the bits back is exact."""
    widened = bits.astype(np.uint32)
    widened <<= 16  # in place: a 0-d array stays an array (an operator would return a numpy scalar)
    return widened.view(np.float32)


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bf16, ties to even; NaNs stay NaN (quiet), infinities stay."""
    bits = np.asarray(values, dtype=np.float32).copy(order="C").view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
    nan = np.isnan(values)
    quiet = (bits >> 16) | np.uint32(0x0040)
    return np.where(nan, quiet, rounded).astype(np.uint16)


def to_numpy(tensor: Tensor) -> np.ndarray:
    """A numpy value array: bf16 widened to float32 (numpy has no bf16), everything else as stored."""
    if tensor.dtype == "BF16":
        return bf16_bits_to_float32(tensor.array)
    return tensor.array


def from_numpy(array: np.ndarray) -> Tensor:
    array = np.asarray(array)
    for tag, dtype in STORAGE.items():
        if tag != "BF16" and array.dtype == dtype:
            return Tensor(tag, array)
    raise ConvertError(f"cannot store a numpy array of dtype {array.dtype} in safetensors")


def cast(tensor: Tensor, dtype: str | None) -> Tensor:
    """Cast a floating tensor to `dtype` ("float32" | "float16" | "bfloat16"); integer tensors and
    `dtype=None` leave the tensor untouched (same bytes)."""
    if dtype is None or tensor.dtype not in FLOAT_TAGS:
        return tensor
    target = check_dtype(dtype)
    if tensor.dtype == target:
        return tensor
    values = to_numpy(tensor)
    if target == "BF16":
        # Through float32: exact for float16 sources; float64 sources round twice (f64 -> f32 -> bf16).
        return Tensor("BF16", float32_to_bf16_bits(values.astype(np.float32)))
    return Tensor(target, values.astype(np.float32 if target == "F32" else np.float16))


def check_dtype(dtype: str) -> str:
    try:
        return DTYPE_TAGS[dtype]
    except KeyError:
        raise ConvertError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}") from None
