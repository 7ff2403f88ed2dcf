"""The PyTorch engine: `transformers.CLIPModel` plus what mlxclip adds (`model.py`), its losses
(`loss.py`), LoRA (`lora.py`), the training step (`train.py`) and the `Backend` implementation
(`backend.py`). It mirrors `mlx_clip/mlx_backend/` file for file; only this package imports torch."""
