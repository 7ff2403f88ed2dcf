"""Read and write safetensors files with numpy alone, keeping every tensor's bytes.

Why not `safetensors.numpy`: numpy has no bfloat16, so that reader refuses BF16 files, and its
writer cannot produce them. Here a tensor is its safetensors dtype tag plus a numpy array of the
same bytes (BF16 as uint16 bits), so transposes, splits and concatenations never round anything.
The format (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header
length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}, then the
raw little-endian data.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlx_clip.errors import CheckpointError

# safetensors dtype tag -> numpy storage dtype (little-endian). BF16 is stored as its raw bits.
STORAGE = {
    "BOOL": np.dtype("?"), "U8": np.dtype("u1"), "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "U32": np.dtype("<u4"), "I32": np.dtype("<i4"), "F32": np.dtype("<f4"),
    "U64": np.dtype("<u8"), "I64": np.dtype("<i8"), "F64": np.dtype("<f8"),
}
FLOAT_TAGS = ("F16", "BF16", "F32", "F64")
# The reference implementation refuses headers above 100 MB; a larger length means a corrupt file.
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class Tensor:
    """A tensor as stored: safetensors dtype tag + numpy array of the stored bytes."""

    dtype: str
    array: np.ndarray

    def __post_init__(self):
        # A mismatch is a bug in our code, never user input: writing would silently cast.
        if self.dtype not in STORAGE or self.array.dtype != STORAGE[self.dtype]:
            raise TypeError(f"tensor tagged {self.dtype} holds a {self.array.dtype} array")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def with_array(self, array: np.ndarray) -> "Tensor":
        return Tensor(self.dtype, array)


@dataclass(frozen=True)
class Entry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a valid safetensors file ({why})")


def read_header(path: str | Path) -> tuple[dict[str, Entry], dict[str, str], int]:
    """Parse and check the header: (entries, metadata, offset of the data section)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, f"file is {size} bytes, too short for a header")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise _corrupt(path, f"header length {length} exceeds the file size {size}: truncated or not safetensors")
            raw = f.read(length)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: expected a file, found a folder") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _corrupt(path, f"header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, "__metadata__ must map strings to strings")
    data_size = size - 8 - length
    entries = {name: _entry(path, name, info, data_size) for name, info in header.items()}
    return entries, metadata, 8 + length


def _entry(path: Path, name: str, info, data_size: int) -> Entry:
    if not isinstance(info, dict):
        raise _corrupt(path, f"entry {name!r} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in STORAGE:
        raise CheckpointError(f"{path}: tensor {name} has dtype {dtype!r}; supported: {', '.join(STORAGE)}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise _corrupt(path, f"tensor {name} has shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise _corrupt(path, f"tensor {name} has data_offsets {offsets!r}")
    begin, end = offsets
    expected = math.prod(shape) * STORAGE[dtype].itemsize
    if not 0 <= begin <= end or end - begin != expected:
        raise _corrupt(path, f"tensor {name} spans bytes {begin}..{end}, expected {expected} bytes for "
                             f"{dtype}{shape}")
    if end > data_size:
        raise _corrupt(path, f"tensor {name} ends at byte {end} but the data section has {data_size}: truncated")
    return Entry(dtype, tuple(shape), begin, end)


def read_metadata(path: str | Path) -> dict[str, str]:
    return read_header(path)[1]


def read_safetensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every tensor of the file as a writable array of its stored bytes, plus the metadata."""
    path = Path(path)
    entries, metadata, data_start = read_header(path)
    tensors = {}
    with path.open("rb") as f:
        for name, entry in entries.items():
            f.seek(data_start + entry.begin)
            buffer = bytearray(entry.end - entry.begin)
            if f.readinto(buffer) != len(buffer):
                raise _corrupt(path, f"tensor {name} is cut short: truncated")
            array = np.frombuffer(buffer, dtype=STORAGE[entry.dtype]).reshape(entry.shape)
            tensors[name] = Tensor(entry.dtype, array)
    return tensors, metadata


def write_safetensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write tensors (sorted by name) with their stored bytes; header padded to 8 bytes as the
    reference writer does, so readers can map the data aligned."""
    path = Path(path)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    names = sorted(tensors)
    for name in names:
        tensor = tensors[name]
        nbytes = tensor.array.size * STORAGE[tensor.dtype].itemsize
        header[name] = {"dtype": tensor.dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            tensor = tensors[name]
            array = np.ascontiguousarray(tensor.array)
            f.write(array.reshape(-1).view(np.uint8).data)
    return path
