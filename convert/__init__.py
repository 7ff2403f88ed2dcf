"""Exact safetensors conversion between MLX, Hugging Face and open_clip CLIP checkpoints."""
