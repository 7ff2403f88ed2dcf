"""PyTorch pickle weights (`pytorch_model.bin`), read only on request and never executed.

`torch.load(weights_only=True)` unpickles with an allow-list of tensor and container types: a
pickle that names any other callable (the `__reduce__` trick) is refused before it runs. torch is
imported here lazily, so the rest of `convert/` works without it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlx_clip.convert.safetensors_io import Tensor
from mlx_clip.errors import CheckpointError

_TORCH_TAGS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
               "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def refuse_pickle(path: Path) -> CheckpointError:
    return CheckpointError(f"{path}: pickle-based weights are not read unless you allow it; pass "
                           "--allow-pickle (allow_pickle=True) to load them with "
                           "torch.load(weights_only=True), or use a safetensors checkpoint")


# torch.load(weights_only=True) could be made to run code before 2.6 (CVE-2025-32434).
SAFE_TORCH = (2, 6)


def check_safe_unpickler(version: str, path: Path) -> None:
    release = tuple(int(part) for part in version.split("+")[0].split(".")[:2] if part.isdigit())
    if release < SAFE_TORCH:
        raise CheckpointError(f"{path}: reading pickled weights needs torch >= 2.6, whose "
                              f"weights_only=True loading cannot be bypassed (this is torch {version}); "
                              "upgrade torch or convert the file to safetensors elsewhere")


def read_pickled(path: str | Path, *, allow_pickle: bool = False) -> dict[str, Tensor]:
    path = Path(path)
    if not allow_pickle:
        raise refuse_pickle(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    import pickle

    import torch

    check_safe_unpickler(torch.__version__, path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError, OSError) as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True), not a plain tensor "
                              f"state dict ({type(err).__name__}: {first})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # training checkpoints wrap the weights
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    tensors = {}
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
        # DistributedDataParallel prefixes every name with `module.`.
        tensors[name.removeprefix("module.")] = _from_torch(path, name, value)
    return tensors


def _from_torch(path: Path, name: str, value) -> Tensor:
    import torch

    tag = _TORCH_TAGS.get(str(value.dtype).removeprefix("torch."))
    if tag is None:
        raise CheckpointError(f"{path}: tensor {name} has dtype {value.dtype}, which safetensors conversion "
                              f"does not support")
    value = value.detach().cpu().contiguous()
    if tag == "BF16":
        return Tensor("BF16", value.view(torch.int16).numpy().view(np.uint16).copy())
    return Tensor(tag, value.numpy().copy())
