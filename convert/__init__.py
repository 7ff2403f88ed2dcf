"""Exact safetensors conversion between MLX, Hugging Face and open_clip CLIP checkpoints."""

from mlx_clip.convert.checkpoint import Checkpoint, read_checkpoint
from mlx_clip.convert.converter import convert
from mlx_clip.convert.detect import FORMATS, detect_format
from mlx_clip.convert.writer import write_checkpoint

__all__ = ["Checkpoint", "FORMATS", "convert", "detect_format", "read_checkpoint", "write_checkpoint"]
