"""SigLIP in MLX (also the fixed-resolution SigLIP 2 checkpoints, which are the same model).
Parameter paths equal the `transformers.SiglipModel` state-dict keys; as for CLIP only the patch
convolution differs in layout (channels-last).

Ported from `transformers/models/siglip/modeling_siglip.py`; tests hold it to that file. What
differs from CLIP (`model.py`, whose encoder layers are reused unchanged):
- image tower: a biased patch convolution, no class token and no pre-norm; the patches are pooled
  by a multihead-attention head (one learned probe attends to them, then a residual MLP);
- text tower: bidirectional (no causal mask), pooled at the last position, whatever token it
  holds (SigLIP is trained on rows padded to the full length), through a biased `head` Linear;
- no projections: the heads give the embeddings; `logit_scale` and `logit_bias` are (1,) tensors.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlx_clip.model.config import CLIPConfig, SiglipTextConfig, SiglipVisionConfig
from mlx_clip.mlx_backend import cpu_math
from mlx_clip.mlx_backend.model import (CLIPEncoder, CLIPMLP, CLIPTextEmbeddings, Linear, keep_rows, normalize,
                                       resize_grid, use_cpu_math)


class SiglipTextTransformer(nn.Module):
    def __init__(self, cfg: SiglipTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.head = Linear(cfg.hidden_size, cfg.projection_size)

    def __call__(self, input_ids: mx.array) -> mx.array:
        """(B, L) token ids -> (B, P) pooled text states (the embedding before normalisation)."""
        last = mx.full((input_ids.shape[0],), input_ids.shape[1] - 1, dtype=mx.int32)
        hidden = self.encoder(self.embeddings(input_ids), pooled_rows=last)
        return self.head(self.final_layer_norm(hidden[:, 0]))


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.grid = cfg.grid
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size, bias=True)
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.hidden_size)

    def positions_for(self, height: int, width: int) -> mx.array:
        """(h*w, D) position embeddings; bicubically resized for another grid, as transformers'
        `interpolate_pos_encoding` (there is no class-token row to keep aside)."""
        table = self.position_embedding.weight
        rows, cols = height // self.patch_size, width // self.patch_size
        if rows == self.grid and cols == self.grid:
            return table
        return resize_grid(table, self.grid, rows, cols)

    def __call__(self, pixels: mx.array, keep: mx.array | None = None) -> mx.array:
        """(B, N, D); with `keep` (B, K) patch indices (patch dropout), the kept patches (B, K, D)."""
        batch, height, width, _ = pixels.shape
        patches = self.patch_embedding(pixels.astype(self.patch_embedding.weight.dtype))  # (B, h, w, D)
        patches = patches.reshape(batch, -1, patches.shape[-1])  # (B, N, D), row-major as torch's flatten
        embeddings = patches + self.positions_for(height, width)
        return embeddings if keep is None else keep_rows(embeddings, keep)


class MultiheadAttention(nn.Module):
    """`torch.nn.MultiheadAttention(batch_first=True)` without masks or dropout, with its parameter
    names: `in_proj_weight` (3D, D) holds the q, k, v rows in that order."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.in_proj_weight = mx.zeros((3 * dim, dim))
        self.in_proj_bias = mx.zeros((3 * dim,))
        self.out_proj = Linear(dim, dim)

    def __call__(self, query: mx.array, memory: mx.array) -> mx.array:
        batch, queries, dim = query.shape
        w_q, w_k, w_v = mx.split(self.in_proj_weight, 3, axis=0)
        b_q, b_k, b_v = mx.split(self.in_proj_bias, 3, axis=0)

        def heads(t: mx.array) -> mx.array:
            return t.reshape(batch, t.shape[1], self.num_heads, -1).transpose(0, 2, 1, 3)  # (B, H, L, hd)

        q = heads(cpu_math.linear(query, w_q, b_q) if use_cpu_math() else mx.addmm(b_q, query, w_q.T))
        k = heads(cpu_math.linear(memory, w_k, b_k) if use_cpu_math() else mx.addmm(b_k, memory, w_k.T))
        v = heads(cpu_math.linear(memory, w_v, b_v) if use_cpu_math() else mx.addmm(b_v, memory, w_v.T))
        if use_cpu_math():
            out = cpu_math.softmax((q * self.scale) @ k.transpose(0, 1, 3, 2)) @ v  # (B, H, Q, hd)
        else:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(batch, queries, dim))


class SiglipMultiheadAttentionPoolingHead(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.probe = mx.zeros((1, 1, cfg.hidden_size))
        self.attention = MultiheadAttention(cfg.hidden_size, cfg.num_attention_heads)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def __call__(self, hidden: mx.array) -> mx.array:
        probe = mx.broadcast_to(self.probe, (hidden.shape[0], 1, hidden.shape[-1])).astype(hidden.dtype)
        pooled = self.attention(probe, hidden)  # (B, 1, D)
        pooled = pooled + self.mlp(self.layernorm(pooled))
        return pooled[:, 0]


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.head = SiglipMultiheadAttentionPoolingHead(cfg)

    def __call__(self, pixels: mx.array, keep: mx.array | None = None) -> mx.array:
        """(B, H, W, C) normalized pixels -> (B, D) pooled image states; `keep`: the patches each
        image keeps (patch dropout, training only)."""
        return self.head(self.post_layernorm(self.encoder(self.embeddings(pixels, keep))))


class SiglipModel(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.text_model = SiglipTextTransformer(config.text_config)
        self.vision_model = SiglipVisionTransformer(config.vision_config)
        self.logit_scale = mx.zeros((1,))
        self.logit_bias = mx.zeros((1,))

    def get_image_features(self, pixels: mx.array, keep: mx.array | None = None) -> mx.array:
        return self.vision_model(pixels, keep)

    def get_text_features(self, input_ids: mx.array) -> mx.array:
        return self.text_model(input_ids)

    def __call__(self, input_ids: mx.array, pixels: mx.array) -> dict[str, mx.array]:
        return sigmoid_outputs(self.get_image_features(pixels), self.get_text_features(input_ids), self.logit_scale,
                               self.logit_bias)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.text_model.encoder.gradient_checkpointing = enabled
        self.vision_model.encoder.gradient_checkpointing = enabled


def sigmoid_outputs(image_features: mx.array, text_features: mx.array, logit_scale: mx.array,
                    logit_bias: mx.array) -> dict[str, mx.array]:
    """transformers' SiglipModel outputs: unit embeddings, and logits scaled by exp(scale) plus the bias."""
    image_embeds, text_embeds = normalize(image_features), normalize(text_features)
    logits_per_text = (text_embeds @ image_embeds.T) * mx.exp(logit_scale) + logit_bias
    return {"image_embeds": image_embeds, "text_embeds": text_embeds,
            "logits_per_image": logits_per_text.T, "logits_per_text": logits_per_text}
