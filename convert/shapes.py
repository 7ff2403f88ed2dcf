"""The tensors a CLIP or SigLIP config implies: Hugging Face names, torch layout.

This is `transformers.CLIPModel(config).state_dict()` (or `SiglipModel`'s) without buffers,
written out so that a checkpoint can be checked before any framework is imported; a test holds it
to transformers.
"""

from __future__ import annotations

from mlx_clip.model.config import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

Shape = tuple[int, ...]

# Tensors a checkpoint may carry that the HF model lacks; converters keep them, engines ignore them.
# open_clip's SigLIP-style `logit_bias` is one.
EXTRA_TENSORS = ("logit_bias",)


def is_buffer(name: str) -> bool:
    """Non-persistent buffers older writers saved: transformers' `position_ids`, open_clip's
    causal `attn_mask`. They are recomputed, never loaded."""
    return name.endswith("position_ids") or name.endswith("attn_mask")


def _encoder(prefix: str, width: int, inner: int, layers: int) -> dict[str, Shape]:
    shapes: dict[str, Shape] = {}
    for i in range(layers):
        p = f"{prefix}.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}.self_attn.{proj}.weight"] = (width, width)
            shapes[f"{p}.self_attn.{proj}.bias"] = (width,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{p}.{norm}.weight"] = (width,)
            shapes[f"{p}.{norm}.bias"] = (width,)
        shapes[f"{p}.mlp.fc1.weight"] = (inner, width)
        shapes[f"{p}.mlp.fc1.bias"] = (inner,)
        shapes[f"{p}.mlp.fc2.weight"] = (width, inner)
        shapes[f"{p}.mlp.fc2.bias"] = (width,)
    return shapes


def _norm(name: str, width: int) -> dict[str, Shape]:
    return {f"{name}.weight": (width,), f"{name}.bias": (width,)}


def text_shapes(t: CLIPTextConfig) -> dict[str, Shape]:
    d = t.hidden_size
    return {
        "text_model.embeddings.token_embedding.weight": (t.vocab_size, d),
        "text_model.embeddings.position_embedding.weight": (t.max_position_embeddings, d),
        **_encoder("text_model", d, t.intermediate_size, t.num_hidden_layers),
        **_norm("text_model.final_layer_norm", d),
    }


def vision_shapes(v: CLIPVisionConfig) -> dict[str, Shape]:
    d = v.hidden_size
    return {
        "vision_model.embeddings.class_embedding": (d,),
        "vision_model.embeddings.patch_embedding.weight": (d, v.num_channels, v.patch_size, v.patch_size),
        "vision_model.embeddings.position_embedding.weight": (v.num_positions, d),
        **_norm("vision_model.pre_layrnorm", d),
        **_encoder("vision_model", d, v.intermediate_size, v.num_hidden_layers),
        **_norm("vision_model.post_layernorm", d),
    }


def siglip_shapes(config: CLIPConfig) -> dict[str, Shape]:
    """`transformers.SiglipModel`: no class token or pre-norm, a biased patch conv, the vision
    attention-pooling head (torch `nn.MultiheadAttention`, fused in_proj), the text head.
    `transformers.Siglip2Model` (NaFlex) differs in one tensor: its patch embedding is a Linear on
    flattened (p, p, C) patches."""
    t, v = config.text_config, config.vision_config
    d, inner = v.hidden_size, v.intermediate_size
    patch = (d, v.patch_dim) if config.is_naflex else (d, v.num_channels, v.patch_size, v.patch_size)
    return {
        "text_model.embeddings.token_embedding.weight": (t.vocab_size, t.hidden_size),
        "text_model.embeddings.position_embedding.weight": (t.max_position_embeddings, t.hidden_size),
        **_encoder("text_model", t.hidden_size, t.intermediate_size, t.num_hidden_layers),
        **_norm("text_model.final_layer_norm", t.hidden_size),
        "text_model.head.weight": (t.projection_size, t.hidden_size),
        "text_model.head.bias": (t.projection_size,),
        "vision_model.embeddings.patch_embedding.weight": patch,
        "vision_model.embeddings.patch_embedding.bias": (d,),
        "vision_model.embeddings.position_embedding.weight": (v.num_positions, d),
        **_encoder("vision_model", d, inner, v.num_hidden_layers),
        **_norm("vision_model.post_layernorm", d),
        "vision_model.head.probe": (1, 1, d),
        "vision_model.head.attention.in_proj_weight": (3 * d, d),
        "vision_model.head.attention.in_proj_bias": (3 * d,),
        "vision_model.head.attention.out_proj.weight": (d, d),
        "vision_model.head.attention.out_proj.bias": (d,),
        **_norm("vision_model.head.layernorm", d),
        "vision_model.head.mlp.fc1.weight": (inner, d),
        "vision_model.head.mlp.fc1.bias": (inner,),
        "vision_model.head.mlp.fc2.weight": (d, inner),
        "vision_model.head.mlp.fc2.bias": (d,),
        "logit_scale": (1,),
        "logit_bias": (1,),
    }


def expected_shapes(config: CLIPConfig) -> dict[str, Shape]:
    """name -> shape of every parameter of `transformers.CLIPModel(config)` (torch layout), or of
    `transformers.SiglipModel(config)` for a SigLIP config."""
    if config.is_siglip:
        return siglip_shapes(config)
    return {
        **text_shapes(config.text_config),
        **vision_shapes(config.vision_config),
        "text_projection.weight": (config.projection_dim, config.text_config.hidden_size),
        "visual_projection.weight": (config.projection_dim, config.vision_config.hidden_size),
        "logit_scale": (),
    }
