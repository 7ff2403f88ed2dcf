"""The MLX engine: CLIP as an `mlx.nn.Module` tree (`model.py`), its losses (`loss.py`), LoRA
(`lora.py`), the compiled training step (`train.py`) and the `Backend` implementation
(`backend.py`). It mirrors `torch_backend/` file for file; only this package imports mlx."""
