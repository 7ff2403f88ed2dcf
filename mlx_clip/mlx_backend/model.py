"""CLIP in MLX. Parameter paths equal the Hugging Face `transformers.CLIPModel` state-dict keys
(typos included: `pre_layrnorm`), so weights move by name alone; only the patch-embedding conv
differs in layout (MLX is channels-last: (out, kh, kw, in)).

Ported from `transformers/models/clip/modeling_clip.py`; tests hold it to that file.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.utils import checkpoint

from mlx_clip.model.config import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from mlx_clip.model.interpolate import bicubic_matrix
from mlx_clip.mlx_backend import cpu_math


def use_cpu_math() -> bool:
    """Whether to use `cpu_math`'s reformulations (see there) instead of MLX's native kernels."""
    return mx.default_device() == mx.cpu


def quick_gelu(x: mx.array) -> mx.array:
    return cpu_math.quick_gelu(x) if use_cpu_math() else x * mx.sigmoid(1.702 * x)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters) whose weight gradient is contiguous on the CPU."""

    def __call__(self, x: mx.array) -> mx.array:
        if not use_cpu_math():
            return super().__call__(x)
        return cpu_math.linear(x, self["weight"], self["bias"] if "bias" in self else None)


def _plain(function):
    """MLX's activations are compiled function objects, which `copy.deepcopy` (the LoRA merge's
    copy of the model) cannot copy; a plain Python function around one is copied by reference."""
    def activation(x: mx.array) -> mx.array:
        return function(x)

    return activation


ACTIVATIONS = {
    "gelu": _plain(nn.gelu),  # erf form, as torch.nn.functional.gelu
    "quick_gelu": quick_gelu,  # OpenAI's original CLIP
    "gelu_new": _plain(nn.gelu_approx),  # tanh form
    "gelu_pytorch_tanh": _plain(nn.gelu_approx),
    "relu": _plain(nn.relu),
}


class CLIPAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (hidden_size // num_heads) ** -0.5
        self.q_proj = Linear(hidden_size, hidden_size)
        self.k_proj = Linear(hidden_size, hidden_size)
        self.v_proj = Linear(hidden_size, hidden_size)
        self.out_proj = Linear(hidden_size, hidden_size)

    def __call__(self, x: mx.array, mask: mx.array | str | None = None,
                 query_rows: mx.array | None = None) -> mx.array:
        """Self-attention over x (B, L, D); with `query_rows` (B,) only those positions ask (one
        row each, the result is (B, 1, D)), every position still answering as key and value."""
        batch, length, dim = x.shape

        def heads(t: mx.array) -> mx.array:
            return t.reshape(batch, t.shape[1], self.num_heads, -1).transpose(0, 2, 1, 3)  # (B, H, L, hd)

        asking = x if query_rows is None else pick_rows(x, query_rows)
        q, k, v = heads(self.q_proj(asking)), heads(self.k_proj(x)), heads(self.v_proj(x))
        if isinstance(mask, str) and query_rows is not None:  # causal, seen from each asking row
            mask = mx.where(mx.arange(length)[None, :] <= query_rows[:, None], 0.0, -1e30)
            mask = mask.astype(q.dtype)[:, None, None, :]  # (B, 1, 1, L)
        if use_cpu_math():  # MLX has no fused CPU attention kernel; its unfused softmax is slow
            scores = (q * self.scale) @ k.transpose(0, 1, 3, 2)  # (B, H, Lq, L)
            if isinstance(mask, str):
                mask = cpu_math.causal_mask(length, scores.dtype)
            out = cpu_math.softmax(scores, mask) @ v
        else:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(batch, asking.shape[1], dim))


def pick_rows(x: mx.array, rows: mx.array) -> mx.array:
    """(B, L, D), (B,) positions -> (B, 1, D): row rows[b] of sample b."""
    return mx.take_along_axis(x, rows.astype(mx.int32)[:, None, None], axis=1)


class CLIPMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.activation = ACTIVATIONS[hidden_act]
        self.fc1 = Linear(hidden_size, intermediate_size)
        self.fc2 = Linear(intermediate_size, hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig | CLIPVisionConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg.hidden_size, cfg.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array | str | None = None,
                 query_rows: mx.array | None = None) -> mx.array:
        residual = x if query_rows is None else pick_rows(x, query_rows)
        x = residual + self.self_attn(self.layer_norm1(x), mask, query_rows)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig | CLIPVisionConfig):
        super().__init__()
        self.layers = [CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]
        # Set by the engine for activation checkpointing: recompute each layer in the backward pass.
        self.gradient_checkpointing = False

    def __call__(self, x: mx.array, mask: mx.array | str | None = None,
                 pooled_rows: mx.array | None = None) -> mx.array:
        """x (B, L, D) through every layer; with `pooled_rows` (B,), the one position per sample the
        tower pools, the last layer computes only those rows and the result is (B, 1, D). Exact:
        attention, MLP and norms act row by row, so in the last layer no other row reaches the
        pooled one (at ViT-B/32 that is 10 of the last layer's 12 matmul units, 7% of a tower)."""
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            rows = pooled_rows if index == last else None
            if self.gradient_checkpointing:
                # nn.utils.checkpoint, not mx.checkpoint: the layer's parameters must be inputs of
                # the checkpointed function, or their gradients are silently zero.
                x = checkpoint(layer, lambda h, layer=layer, rows=rows: layer(h, mask, rows))(x)
            else:
                x = layer(x, mask, rows)
        return x


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def __call__(self, input_ids: mx.array) -> mx.array:
        length = input_ids.shape[-1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:length]


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.eos_token_id = cfg.eos_token_id
        self.max_length = cfg.max_position_embeddings
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def eot_positions(self, input_ids: mx.array) -> mx.array:
        if self.eos_token_id == 2:
            # Legacy configs: EOT is the highest id in OpenAI's vocabulary.
            return mx.argmax(input_ids, axis=-1)
        # The first EOT, whatever follows it (padding may reuse the EOT id).
        is_eot = (input_ids == self.eos_token_id).astype(mx.int32)
        return mx.argmax(is_eot, axis=-1)

    def __call__(self, input_ids: mx.array) -> mx.array:
        """(B, L) token ids -> pooled EOT states (B, D), before the projection."""
        hidden = self.encoder(self.embeddings(input_ids), mask="causal", pooled_rows=self.eot_positions(input_ids))
        return self.final_layer_norm(hidden[:, 0])


def resize_grid(patches: mx.array, grid: int, rows: int, cols: int) -> mx.array:
    """(grid*grid, D) patch position embeddings -> (rows*cols, D), bicubic along each axis as
    transformers' `interpolate_pos_encoding` (torch's bicubic, align_corners=False)."""
    dim = patches.shape[-1]
    row_m = mx.array(bicubic_matrix(grid, rows))  # (rows, g)
    col_m = mx.array(bicubic_matrix(grid, cols))  # (cols, g)
    resized = mx.einsum("rg,gwd->rwd", row_m, patches.reshape(grid, grid, dim))  # (rows, g, D)
    return mx.einsum("cw,rwd->rcd", col_m, resized).reshape(rows * cols, dim)


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.grid = cfg.image_size // cfg.patch_size
        self.class_embedding = mx.zeros((cfg.hidden_size,))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.hidden_size)

    def positions_for(self, height: int, width: int) -> mx.array:
        """Position embeddings (1 + h*w, D) for a patch grid; bicubically interpolated when the grid
        differs from the trained one, as transformers' `interpolate_pos_encoding` does."""
        table = self.position_embedding.weight
        rows, cols = height // self.patch_size, width // self.patch_size
        if rows == self.grid and cols == self.grid:
            return table
        return mx.concatenate([table[:1], resize_grid(table[1:], self.grid, rows, cols)], axis=0)

    def __call__(self, pixels: mx.array, keep: mx.array | None = None) -> mx.array:
        """(B, 1+N, D); with `keep` (B, K) patch indices (patch dropout), (B, 1+K, D): the class
        token and the kept patches, each with its position."""
        batch, height, width, _ = pixels.shape
        patches = self.patch_embedding(pixels.astype(self.patch_embedding.weight.dtype))  # (B, h, w, D)
        patches = patches.reshape(batch, -1, patches.shape[-1])  # (B, N, D), row-major as torch's flatten
        cls = mx.broadcast_to(self.class_embedding, (batch, 1, patches.shape[-1])).astype(patches.dtype)
        embeddings = mx.concatenate([cls, patches], axis=1)  # (B, N+1, D)
        embeddings = embeddings + self.positions_for(height, width)
        if keep is None:
            return embeddings
        return mx.concatenate([embeddings[:, :1], keep_rows(embeddings[:, 1:], keep)], axis=1)


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def __call__(self, pixels: mx.array, keep: mx.array | None = None) -> mx.array:
        """(B, H, W, C) normalized pixels -> pooled class-token states (B, D), before the projection;
        `keep`: the patches each image keeps (patch dropout, training only)."""
        hidden = self.pre_layrnorm(self.embeddings(pixels, keep))
        class_rows = mx.zeros((pixels.shape[0],), dtype=mx.int32)
        return self.post_layernorm(self.encoder(hidden, pooled_rows=class_rows)[:, 0])


class CLIPModel(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config.text_config)
        self.vision_model = CLIPVisionTransformer(config.vision_config)
        self.visual_projection = Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.text_projection = Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = mx.array(config.logit_scale_init_value, dtype=mx.float32)

    def get_image_features(self, pixels: mx.array, keep: mx.array | None = None) -> mx.array:
        return self.visual_projection(self.vision_model(pixels, keep))

    def get_text_features(self, input_ids: mx.array) -> mx.array:
        return self.text_projection(self.text_model(input_ids))

    def __call__(self, input_ids: mx.array, pixels: mx.array) -> dict[str, mx.array]:
        image_embeds = normalize(self.get_image_features(pixels))
        text_embeds = normalize(self.get_text_features(input_ids))
        logits_per_text = mx.exp(self.logit_scale) * (text_embeds @ image_embeds.T)
        return {"image_embeds": image_embeds, "text_embeds": text_embeds,
                "logits_per_image": logits_per_text.T, "logits_per_text": logits_per_text}

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.text_model.encoder.gradient_checkpointing = enabled
        self.vision_model.encoder.gradient_checkpointing = enabled


def normalize(x: mx.array) -> mx.array:
    return x / mx.linalg.norm(x, axis=-1, keepdims=True)


def init_weights(model: CLIPModel, seed: int = 0) -> None:
    """Random initialisation as transformers does it (see `mlx_clip/model/builtin.py`)."""
    from mlx_clip.convert.layout import torch_to_mlx
    from mlx_clip.model.builtin import random_weights

    weights = random_weights(model.config, seed)
    model.load_weights([(k, mx.array(torch_to_mlx(k, v))) for k, v in weights.items()], strict=True)
    mx.eval(model.parameters())


def keep_rows(tokens: mx.array, keep: mx.array) -> mx.array:
    """(B, N, D) tokens -> (B, K, D): row b keeps tokens keep[b] (patch dropout)."""
    index = mx.broadcast_to(keep.astype(mx.int32)[..., None], (*keep.shape, tokens.shape[-1]))
    return mx.take_along_axis(tokens, index, axis=1)
