"""open_clip <-> Hugging Face tensor names: one table, four transforms, each with its inverse.

open_clip (`open_clip/transformer.py`: `VisionTransformer`, `TextTransformer`,
`ResidualAttentionBlock` on `nn.MultiheadAttention`) fuses q, k and v into `in_proj_weight`
(3*width, width), stores the projections as (width, embed_dim) matrices applied as `x @ proj`
where transformers stores `nn.Linear` weights (embed_dim, width), and may keep `logit_scale` as
shape (1,). Every transform only moves bytes (transpose, split, concatenate, reshape), so a
round trip gives back the same bits in any dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from mlx_clip.convert.safetensors_io import Tensor
from mlx_clip.convert.shapes import Shape
from mlx_clip.errors import ConvertError


@dataclass(frozen=True)
class Transform:
    """`to_hf` maps one open_clip array to the HF arrays; `to_open_clip` is its inverse;
    `open_clip_shape` gives the open_clip shape implied by the HF shapes."""

    name: str
    to_hf: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_open_clip: Callable[[tuple[np.ndarray, ...]], np.ndarray]
    open_clip_shape: Callable[[tuple[Shape, ...]], Shape]


IDENTITY = Transform("identity", lambda a: (a,), lambda hf: hf[0], lambda s: s[0])
# `x @ proj` (open_clip) == `x @ W.T` (nn.Linear): the same matrix, transposed.
TRANSPOSE = Transform("transpose", lambda a: (a.T,), lambda hf: hf[0].T, lambda s: s[0][::-1])
# nn.MultiheadAttention's in_proj rows are [q; k; v] (torch.nn.functional._in_projection_packed).
FUSED_QKV = Transform("fused_qkv", lambda a: tuple(np.split(a, 3, axis=0)),
                      lambda hf: np.concatenate(hf, axis=0), lambda s: (3 * s[0][0], *s[0][1:]))


def reshape_to(open_clip_shape: Shape) -> Transform:
    """HF keeps `logit_scale` a 0-d tensor; open_clip's `nonscalar_logit_scale` makes it (1,)."""
    return Transform(f"reshape{open_clip_shape}", lambda a: (a.reshape(()),),
                     lambda hf: hf[0].reshape(open_clip_shape), lambda s: open_clip_shape)


@dataclass(frozen=True)
class Rule:
    hf: tuple[str, ...]
    open_clip: str
    transform: Transform


def weight_and_bias(hf: str, oc: str, how=IDENTITY) -> list[tuple]:
    """The rows of a module with a weight and a bias, moved by `how` (both converters' tables)."""
    return [(f"{hf}.weight", f"{oc}.weight", how), (f"{hf}.bias", f"{oc}.bias", how)]


# One encoder layer: HF suffix(es) <- open_clip suffix.
QKV_PROJ = tuple(f"self_attn.{p}_proj" for p in "qkv")  # HF's three projections of one fused matrix
LAYER_TABLE = [
    (tuple(f"{p}.weight" for p in QKV_PROJ), "attn.in_proj_weight", FUSED_QKV),
    (tuple(f"{p}.bias" for p in QKV_PROJ), "attn.in_proj_bias", FUSED_QKV),
    *weight_and_bias("self_attn.out_proj", "attn.out_proj"),
    *weight_and_bias("layer_norm1", "ln_1"),
    *weight_and_bias("layer_norm2", "ln_2"),
    *weight_and_bias("mlp.fc1", "mlp.c_fc"),
    *weight_and_bias("mlp.fc2", "mlp.c_proj"),
]

# Everything outside the encoder layers. `{text}` is "" for open_clip's `CLIP` and "text." for
# `CustomTextCLIP` (model_cfg `custom_text`), whose text tower is a `TextTransformer` submodule.
MODEL_TABLE = [
    ("vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight", IDENTITY),
    ("vision_model.embeddings.class_embedding", "visual.class_embedding", IDENTITY),
    ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding", IDENTITY),
    *weight_and_bias("vision_model.pre_layrnorm", "visual.ln_pre"),
    *weight_and_bias("vision_model.post_layernorm", "visual.ln_post"),
    ("visual_projection.weight", "visual.proj", TRANSPOSE),
    ("text_model.embeddings.token_embedding.weight", "{text}token_embedding.weight", IDENTITY),
    ("text_model.embeddings.position_embedding.weight", "{text}positional_embedding", IDENTITY),
    *weight_and_bias("text_model.final_layer_norm", "{text}ln_final"),
    ("text_projection.weight", "{text}text_projection", TRANSPOSE),
]

ENCODERS = [("vision_model.encoder.layers.{i}.", "visual.transformer.resblocks.{i}."),
            ("text_model.encoder.layers.{i}.", "{text}transformer.resblocks.{i}.")]


def rules(vision_layers: int, text_layers: int, *, text_prefix: str = "",
          logit_scale_shape: Shape = ()) -> list[Rule]:
    """The concrete table for a model with these layer counts."""
    out = [Rule((hf,), oc.format(text=text_prefix), t) for hf, oc, t in MODEL_TABLE]
    out.append(Rule(("logit_scale",), "logit_scale", reshape_to(logit_scale_shape)))
    for (hf_layer, oc_layer), layers in zip(ENCODERS, (vision_layers, text_layers)):
        for i in range(layers):
            hf_p, oc_p = hf_layer.format(i=i), oc_layer.format(i=i, text=text_prefix)
            for hf, oc, t in LAYER_TABLE:
                hf_names = tuple(hf_p + n for n in hf) if isinstance(hf, tuple) else (hf_p + hf,)
                out.append(Rule(hf_names, oc_p + oc, t))
    return out


def open_clip_shapes(table: list[Rule], hf_shapes: dict[str, Shape]) -> dict[str, Shape]:
    return {r.open_clip: r.transform.open_clip_shape(tuple(hf_shapes[n] for n in r.hf)) for r in table}


def open_clip_to_hf(tensors: dict[str, Tensor], table: list[Rule]) -> dict[str, Tensor]:
    out = {}
    for rule in table:
        source = tensors[rule.open_clip]
        for name, array in zip(rule.hf, rule.transform.to_hf(source.array)):
            out[name] = source.with_array(array)
    return out


def hf_to_open_clip(tensors: dict[str, Tensor], table: list[Rule]) -> dict[str, Tensor]:
    out = {}
    for rule in table:
        parts = [tensors[n] for n in rule.hf]
        dtypes = {p.dtype for p in parts}
        if len(dtypes) > 1:
            raise ConvertError(f"{', '.join(rule.hf)} have different dtypes ({', '.join(sorted(dtypes))}); "
                               f"open_clip fuses them into one tensor {rule.open_clip}")
        out[rule.open_clip] = parts[0].with_array(rule.transform.to_open_clip(tuple(p.array for p in parts)))
    return out
