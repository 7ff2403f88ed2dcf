"""MLX-quantized inference (`--quantize 8|4`, `mlxclip convert --quantize`).

What is quantized: every Linear of the model whose input width is a multiple of the group size,
which for CLIP is each transformer layer's q/k/v/out projections, fc1 and fc2 and the two
projections (SigLIP and NaFlex SigLIP 2: the same layers, the text head and the pooling head's
out_proj and MLP). A Linear of another width stays float32 (its rows do not split into groups).
Each weight row is cut into groups of `QUANTIZE_GROUP_SIZE` (64) and stored as `bits`-bit integers
with one float scale and one bias per group: MLX's affine `mx.quantize`. A folder holds them as
mlx-lm does: `<path>.weight` (the integers packed in uint32), `<path>.scales`, `<path>.biases`, and
a "quantization": {"group_size": 64, "bits": N} entry in config.json.

What stays float32: the layer norms, the class and position embeddings, the patch convolution
(NaFlex SigLIP 2's patch embedding too, though it is a Linear: see FLOAT_LINEARS),
logit_scale (and SigLIP's logit_bias, pooling probe and in_proj_weight), under 2% of ViT-B/32's
weights together, and the ones whose errors nothing downstream averages out: a norm's gain
scales every feature it touches, a position embedding is added to every token, logit_scale is
exponentiated. The token embedding (25M of ViT-B/32's 151M weights) stays float32 too: it is a
lookup, so it costs memory but no time, and a row lookup has no matmul to share the error with.

Speed: on a GPU (Metal or CUDA) the layer calls `mx.quantized_matmul`, which reads the packed
weights directly. MLX has no fast CPU kernel for it (measured on a 2-core Xeon with AVX-512:
800x768 @ 768x3072 takes ~2.2 s quantized, 8- or 4-bit, against ~28 ms in float32, ~78x; at 50
rows 136 ms against 2.4 ms), so on the CPU the layer dequantizes its weight inside the graph
(`mx.dequantize`) and multiplies with the float32 BLAS. The weights stay at 8 or 4 bits in memory;
each call makes a transient float32 copy of one layer's weight, which is what the CPU pays over
float32: ~4.3 ns a weight here (10 ms for 3072x768, either width), so a ViT-B/32 forward pass
adds ~0.37 s in the image tower (85M weights) and ~0.16 s in the text tower (38M) on each CPU
stream, whatever the batch. Measured on that machine while others used it: one image 2-3x the
float32 time (ViT-B/32: 0.28 -> 0.81 s), batch 32 5-10% fewer images/s (7.2 -> 6.9 at 8 bits).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path

from mlx_clip.convert import detect
from mlx_clip.convert.checkpoint import Checkpoint, _listed
from mlx_clip.convert.resolution import POSITIONS, at_image_size
from mlx_clip.errors import CheckpointError, ConfigError
from mlx_clip.mlx_backend.model import use_cpu_math
from mlx_clip.model.config import QUANTIZE_GROUP_SIZE, CLIPConfig, check_quantize, describe_quantization


class QuantizedLinear(nn.Module):
    """A Linear whose weight is MLX-quantized, with `nn.QuantizedLinear`'s parameters (`weight`
    packed uint32, `scales`, `biases`, and `bias` if the float layer had one). Frozen: the engine
    quantizes for inference only."""

    def __init__(self, input_dims: int, output_dims: int, bias: bool = True, *, group_size: int, bits: int):
        super().__init__()
        self.group_size, self.bits = group_size, bits
        # Zeros of the stored shapes, replaced by `from_linear` or by a folder's weights.
        self.weight = mx.zeros((output_dims, input_dims * bits // 32), dtype=mx.uint32)
        self.scales = mx.zeros((output_dims, input_dims // group_size))
        self.biases = mx.zeros((output_dims, input_dims // group_size))
        if bias:
            self.bias = mx.zeros((output_dims,))
        self.freeze()

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group_size: int, bits: int) -> "QuantizedLinear":
        output_dims, input_dims = linear.weight.shape
        layer = cls(input_dims, output_dims, "bias" in linear, group_size=group_size, bits=bits)
        layer.weight, layer.scales, layer.biases = mx.quantize(linear.weight, group_size, bits)
        if "bias" in linear:
            layer.bias = linear.bias
        return layer

    def dequantized_weight(self) -> mx.array:
        return mx.dequantize(self["weight"], self["scales"], self["biases"], group_size=self.group_size,
                             bits=self.bits)

    def __call__(self, x: mx.array) -> mx.array:
        if use_cpu_math():  # see the module docstring: MLX's CPU quantized matmul is ~78x slower
            weight = self.dequantized_weight()
            return mx.addmm(self["bias"], x, weight.T) if "bias" in self else x @ weight.T
        out = mx.quantized_matmul(x, self["weight"], self["scales"], self["biases"], transpose=True,
                                  group_size=self.group_size, bits=self.bits)
        return out + self["bias"] if "bias" in self else out


# Linears kept float32 whatever their width. NaFlex SigLIP 2's patch embedding is the other
# families' patch convolution as a Linear on flattened patches: it sees raw pixels and feeds every
# token, so it stays float32 as the convolution does (and, at 0.6M weights in a base model, costs
# little). Measured on a random NaFlex model with a 192-wide patch embedding, on 11 photos: the
# largest image 1 - cosine to float32 is 1.6e-4 at 8 bits and 0.042 at 4 with it quantized, 8.1e-5
# and 0.027 without.
FLOAT_LINEARS = frozenset({"vision_model.embeddings.patch_embedding"})


def quantizes(path: str, module: nn.Module) -> bool:
    """Whether `quantize_model` quantizes the module at `path`: a float Linear whose rows split
    into groups, unless it is one of FLOAT_LINEARS."""
    return (isinstance(module, nn.Linear) and path not in FLOAT_LINEARS
            and module.weight.shape[-1] % QUANTIZE_GROUP_SIZE == 0)


def _replace_leaves(model: nn.Module, make) -> None:
    """Each leaf module `m` at `path` becomes `make(path, m)` (itself when unchanged)."""
    leaves = tree_map_with_path(make, model.leaf_modules(), is_leaf=nn.Module.is_module)
    model.update_modules(leaves)


def quantize_model(model: nn.Module, bits: int) -> nn.Module:
    """`model` (a float CLIP or SigLIP, in place) with its Linears quantized to `bits`, and the
    "quantization" entry in its config so that a saved copy loads back quantized."""
    check_quantize(bits)
    if model.config.quantization is not None:
        raise ConfigError(f"--quantize {bits}: the model is already quantized "
                          f"({describe_quantization(model.config.quantization)}); drop --quantize")
    _replace_leaves(model, lambda path, m: QuantizedLinear.from_linear(m, group_size=QUANTIZE_GROUP_SIZE, bits=bits)
                    if quantizes(path, m) else m)
    model.config = dataclasses.replace(model.config, quantization={"group_size": QUANTIZE_GROUP_SIZE, "bits": bits})
    return model


def check_requantize(folder: Path, quantization: dict, bits: int | None) -> None:
    """A quantized folder loads as written; `--quantize` may repeat its width, not change it."""
    if bits is not None and bits != quantization["bits"]:
        raise ConfigError(f"--quantize {bits}: {folder} is already quantized ({describe_quantization(quantization)}); "
                          "drop --quantize, or quantize the float folder it was made from")


def read_quantized(folder: str | Path, image_size: int | None = None) -> tuple[CLIPConfig, dict[str, mx.array]]:
    """The config and weights (MLX layout, quantized triplets as stored) of a quantized folder; with
    `image_size`, the position embeddings resampled as a float folder's are (`convert/resolution.py`)."""
    folder = Path(folder)
    config = CLIPConfig.from_file(folder / detect.CONFIG)
    path = detect.weights_file(folder, (detect.SAFETENSORS, detect.SAFETENSORS_INDEX))
    if path is None:
        raise CheckpointError(f"{folder / detect.SAFETENSORS}: file not found (a quantized MLX folder keeps its "
                              "weights in safetensors)")
    files = detect.shard_files(path) if path.name == detect.SAFETENSORS_INDEX else [path]
    weights = {name: array for file in files for name, array in mx.load(str(file)).items()}
    if image_size is not None and POSITIONS in weights:
        positions = {POSITIONS: np.array(weights[POSITIONS].astype(mx.float32))}
        resized = at_image_size(Checkpoint(config, positions, "mlx", folder), image_size)
        config = resized.config
        weights[POSITIONS] = mx.array(resized.tensors[POSITIONS]).astype(weights[POSITIONS].dtype)
    return config, weights


def load_quantized(model: nn.Module, weights: dict[str, mx.array], label: str) -> nn.Module:
    """`model` (built from a quantized folder's config) with a QuantizedLinear wherever `weights`
    has `<path>.scales`, then every weight loaded; CheckpointError naming `label` on a mismatch."""
    quantization = model.config.quantization
    group_size, bits = quantization["group_size"], quantization["bits"]

    def swap(path: str, module: nn.Module) -> nn.Module:
        if not (isinstance(module, nn.Linear) and f"{path}.scales" in weights):
            return module
        output_dims, input_dims = module.weight.shape
        return QuantizedLinear(input_dims, output_dims, "bias" in module, group_size=group_size, bits=bits)

    _replace_leaves(model, swap)
    expected = dict(tree_flatten(model.parameters()))
    _check_names(weights, expected, label)
    model.load_weights(list(weights.items()), strict=True)
    return model


def _check_names(weights: dict[str, mx.array], expected: dict[str, mx.array], label: str) -> None:
    missing, unexpected = expected.keys() - weights.keys(), weights.keys() - expected.keys()
    if missing:
        raise CheckpointError(f"{label}: {len(missing)} tensors that config.json implies are missing: "
                              f"{_listed(missing)}")
    if unexpected:
        raise CheckpointError(f"{label}: {len(unexpected)} tensors that config.json does not describe: "
                              f"{_listed(unexpected)}")
    for name, array in expected.items():
        found = weights[name]
        if found.shape != array.shape or (array.dtype == mx.uint32) != (found.dtype == mx.uint32):
            raise CheckpointError(f"{label}: tensor {name} is {found.dtype} {tuple(found.shape)}, expected "
                                  f"{array.dtype if array.dtype == mx.uint32 else 'float'} {tuple(array.shape)} "
                                  "from config.json's quantization")
