"""Model FLOPs of CLIP, counted from the config (2 per multiply-add, matmuls and attention only):
the numerator of MFU. A training step is counted as 3 forward passes (the backward pass computes
a gradient for both operands of every matmul), as PaLM's and nanoGPT's MFU do."""

from __future__ import annotations

from mlx_clip.model.config import CLIPConfig


def tower_forward_flops(tokens: int, width: int, inner: int, layers: int) -> int:
    per_layer = tokens * (4 * width * width + 2 * width * inner)  # q, k, v, out projections and the MLP
    attention = 2 * tokens * tokens * width  # scores and the weighted sum, over all heads
    return 2 * layers * (per_layer + attention)


def forward_flops(config: CLIPConfig, text_length: int, image_size: int | None = None) -> dict[str, int]:
    """FLOPs of one image and one text through their towers and projections."""
    v, t = config.vision_config, config.text_config
    size = image_size or v.image_size
    patches = (size // v.patch_size) ** 2
    image = 2 * patches * v.num_channels * v.patch_size ** 2 * v.hidden_size  # patch embedding
    image += tower_forward_flops(patches + 1, v.hidden_size, v.intermediate_size, v.num_hidden_layers)
    image += 2 * v.hidden_size * config.projection_dim
    text = tower_forward_flops(text_length, t.hidden_size, t.intermediate_size, t.num_hidden_layers)
    text += 2 * t.hidden_size * config.projection_dim
    return {"image": image, "text": text}


def train_flops_per_pair(config: CLIPConfig, text_length: int) -> int:
    forward = forward_flops(config, text_length)
    return 3 * (forward["image"] + forward["text"])
