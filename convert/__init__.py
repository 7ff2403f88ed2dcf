"""Exact safetensors conversion between MLX, Hugging Face and open_clip CLIP checkpoints."""

from convert.checkpoint import Checkpoint, read_checkpoint
from convert.converter import convert
from convert.detect import FORMATS, detect_format
from convert.writer import write_checkpoint

__all__ = ["Checkpoint", "FORMATS", "convert", "detect_format", "read_checkpoint", "write_checkpoint"]
