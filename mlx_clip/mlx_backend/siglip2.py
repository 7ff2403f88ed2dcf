"""NaFlex SigLIP 2 in MLX (`transformers.Siglip2Model`, model_type "siglip2"). Parameter paths
equal its state-dict keys and every tensor has the same layout (the patch embedding is a Linear),
so a state dict loads by name alone (`load_state_dict`).

Ported from `transformers/models/siglip2/modeling_siglip2.py`; tests hold it to that file. What
differs from SigLIP (`siglip.py`, whose text tower, encoder layers and pooling head are reused):
- images arrive as patches, packed in one (B, L, p*p*C + 3) array (`mlx_clip.model.naflex.pack`):
  each row a flattened patch, then 1/0 for real/padding, then the image's (rows, cols) grid;
- the square position table is resized to each image's grid with torch's antialiased bilinear
  filter (`F.interpolate(mode="bilinear", align_corners=False, antialias=True)`), here one matmul
  with weights computed inside the graph from (rows, cols) (`resize_weights`), so one compiled
  function serves every mix of aspect ratios, and the gradient reaches the table;
- padded patches are masked as keys in every encoder layer and in the attention-pooling head.

The config is `mlx_clip.model.config.CLIPConfig` of model_type "siglip2".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_clip.errors import ConfigError
from mlx_clip.mlx_backend import cpu_math
from mlx_clip.mlx_backend.model import CLIPEncoder, Linear, use_cpu_math
from mlx_clip.mlx_backend.siglip import (MultiheadAttention, SiglipMultiheadAttentionPoolingHead,
                                         SiglipTextTransformer, sigmoid_outputs)

# Added to the attention scores of padded keys: large rather than -inf, so that no row can turn
# into inf - inf = nan (as `cpu_math.causal_mask`).
_MASKED = -1e30


def _axis_weights(index: mx.array, size: mx.array, grid: int) -> mx.array:
    """(B, L) output positions along one axis of (B, 1) sizes -> (B, L, grid) resize weights: the
    rows of torch's antialiased bilinear resize from `grid` to `size` (aten's `_compute_weights_aa`),
    in float32. Outside the filter's support the
    triangle is 0, which is what torch's clamped tap range leaves out, so no range is needed."""
    scale = grid / size
    inverse = mx.where(scale >= 1.0, 1.0 / scale, 1.0)
    center = scale * (index + 0.5)
    taps = mx.arange(grid, dtype=mx.float32)
    weights = mx.maximum(0.0, 1.0 - mx.abs((taps - center[..., None] + 0.5) * inverse[..., None]))
    return weights / weights.sum(axis=-1, keepdims=True)


def resize_weights(rows: mx.array, cols: mx.array, grid: int, length: int) -> mx.array:
    """(B,) patch rows and columns per image -> (B, length, grid * grid) float32 W such that
    W @ table is each image's position embeddings resized to its grid (held by tests to a float64
    reference and to transformers' `resize_positional_embeddings`). Padding positions take the first position's weights, as transformers does."""
    position = mx.arange(length, dtype=mx.float32)[None, :]  # (1, L)
    # An all-padding row (a zero-filled probe) has a 0x0 grid: sized 1x1, so it stays finite.
    rows = mx.maximum(rows.astype(mx.float32), 1.0)[:, None]  # (B, 1)
    cols = mx.maximum(cols.astype(mx.float32), 1.0)[:, None]
    position = mx.where(position < rows * cols, position, 0.0)
    row = mx.floor(position / cols)
    col = position - row * cols
    weights = _axis_weights(row, rows, grid)[..., :, None] * _axis_weights(col, cols, grid)[..., None, :]
    return weights.reshape(*weights.shape[:2], grid * grid)


def key_padding_mask(pixel_attention_mask: mx.array, dtype: mx.Dtype) -> mx.array:
    """(B, L) 1 = real patch, 0 = padding -> (B, 1, 1, L) additive mask on the keys."""
    keep = pixel_attention_mask.astype(mx.bool_)[:, None, None, :]
    return mx.where(keep, 0.0, _MASKED).astype(dtype)


class Siglip2VisionEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.grid = math.isqrt(cfg.num_patches)
        patch_dim = cfg.patch_size * cfg.patch_size * cfg.num_channels  # a patch flattened as (p, p, C)
        self.patch_embedding = Linear(patch_dim, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)

    def __call__(self, pixel_values: mx.array, weights: mx.array) -> mx.array:
        """(B, L, p*p*C) patches, (B, L, g*g) resize weights (`resize_weights`) -> (B, L, D)."""
        table = self.position_embedding.weight  # (g*g, D), the (g, g) grid row-major
        patches = self.patch_embedding(pixel_values.astype(table.dtype))
        # transformers resizes in float32 and casts the result to the table's dtype.
        positions = (weights.astype(mx.float32) @ table.astype(mx.float32)).astype(table.dtype)
        return patches + positions


class MaskedMultiheadAttention(MultiheadAttention):
    """`MultiheadAttention` (same parameters) that takes an additive key mask, as torch's
    `key_padding_mask`."""

    def __call__(self, query: mx.array, memory: mx.array, mask: mx.array | None = None) -> mx.array:
        batch, queries, dim = query.shape
        w_q, w_k, w_v = mx.split(self.in_proj_weight, 3, axis=0)
        b_q, b_k, b_v = mx.split(self.in_proj_bias, 3, axis=0)

        def heads(t: mx.array) -> mx.array:
            return t.reshape(batch, t.shape[1], self.num_heads, -1).transpose(0, 2, 1, 3)  # (B, H, L, hd)

        def project(x: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
            return heads(cpu_math.linear(x, weight, bias) if use_cpu_math() else mx.addmm(bias, x, weight.T))

        q, k, v = project(query, w_q, b_q), project(memory, w_k, b_k), project(memory, w_v, b_v)
        if use_cpu_math():
            out = cpu_math.softmax((q * self.scale) @ k.transpose(0, 1, 3, 2), mask) @ v  # (B, H, Q, hd)
        else:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(batch, queries, dim))


class Siglip2MultiheadAttentionPoolingHead(SiglipMultiheadAttentionPoolingHead):
    """SigLIP's head (same parameters) whose probe attends to the real patches only."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.attention = MaskedMultiheadAttention(cfg.hidden_size, cfg.num_attention_heads)

    def __call__(self, hidden: mx.array, mask: mx.array | None = None) -> mx.array:
        probe = mx.broadcast_to(self.probe, (hidden.shape[0], 1, hidden.shape[-1])).astype(hidden.dtype)
        pooled = self.attention(probe, hidden, mask)  # (B, 1, D)
        pooled = pooled + self.mlp(self.layernorm(pooled))
        return pooled[:, 0]


class Siglip2VisionTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embeddings = Siglip2VisionEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.head = Siglip2MultiheadAttentionPoolingHead(cfg)

    def __call__(self, packed: mx.array) -> mx.array:
        """(B, L, p*p*C + 3) packed patches (`naflex.pack`) -> (B, D) pooled image states."""
        pixel_values, pixel_attention_mask = packed[..., :-3], packed[..., -3]
        weights = resize_weights(packed[:, 0, -2], packed[:, 0, -1], self.embeddings.grid, packed.shape[1])
        hidden = self.embeddings(pixel_values, weights)
        mask = key_padding_mask(pixel_attention_mask, hidden.dtype)
        hidden = self.post_layernorm(self.encoder(hidden, mask))
        return self.head(hidden, mask)


class Siglip2Model(nn.Module):
    """`config`: a `mlx_clip.model.config.CLIPConfig` of model_type "siglip2"."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.text_model = SiglipTextTransformer(config.text_config)
        self.vision_model = Siglip2VisionTransformer(config.vision_config)
        self.logit_scale = mx.zeros((1,))
        self.logit_bias = mx.zeros((1,))

    def get_image_features(self, packed: mx.array, keep: mx.array | None = None) -> mx.array:
        """(B, L, p*p*C + 3) packed patches -> (B, D) pooled image states, before normalisation.
        `keep` (patch dropout) exists for the engine's one signature; NaFlex refuses it earlier."""
        if keep is not None:
            raise ConfigError("patch dropout is not available for NaFlex SigLIP 2: lower --max-num-patches instead")
        return self.vision_model(mx.array(packed))

    def get_text_features(self, input_ids: mx.array) -> mx.array:
        """(B, T) token ids -> (B, D) pooled text states (last position), before normalisation."""
        return self.text_model(mx.array(input_ids))

    def __call__(self, input_ids: mx.array, packed: mx.array) -> dict[str, mx.array]:
        return sigmoid_outputs(self.get_image_features(packed), self.get_text_features(input_ids), self.logit_scale,
                               self.logit_bias)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.text_model.encoder.gradient_checkpointing = enabled
        self.vision_model.encoder.gradient_checkpointing = enabled


def _to_mx(value: Any) -> mx.array:
    """A numpy array, an mx.array or a torch tensor (duck-typed: this engine never imports torch)."""
    if isinstance(value, mx.array):
        return value
    if hasattr(value, "detach"):  # a torch tensor: numpy has no bfloat16, so widen it and narrow back
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            return mx.array(value.float().numpy()).astype(mx.bfloat16)
        value = value.numpy()
    return mx.array(np.asarray(value))


def load_state_dict(model: Siglip2Model, state: Mapping[str, Any], strict: bool = True) -> Siglip2Model:
    """Load a `transformers.Siglip2Model` state dict (torch tensors, numpy or mx arrays) by name:
    every layout is already MLX's. With `strict`, missing, extra or misshapen tensors raise."""
    model.load_weights([(name, _to_mx(value)) for name, value in state.items()], strict=strict)
    mx.eval(model.parameters())
    return model


def from_torch_state_dict(config, state: Mapping[str, Any]) -> Siglip2Model:
    """A new MLX model holding the weights of a `transformers.Siglip2Model` state dict."""
    return load_state_dict(Siglip2Model(config), state)
