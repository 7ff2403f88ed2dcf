"""The PyTorch engine: transformers.CLIPModel plus what mlxclip adds, mirroring the MLX engine."""
