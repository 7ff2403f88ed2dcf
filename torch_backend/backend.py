"""The PyTorch engine behind the Backend protocol (mirrors `mlx_clip/mlx_backend.py`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mlx_clip.config import CLIPConfig
from torch_backend.model import build_model, load_torch_model, select_device


class TorchBackend:
    name = "torch"

    def __init__(self, model, config: CLIPConfig, device: torch.device):
        self.model = model.eval()
        self.config = config
        self.device = device

    @classmethod
    def from_folder(cls, folder, *, dtype=None, allow_pickle=False, device=None) -> "TorchBackend":
        chosen = select_device(device)
        model, config = load_torch_model(folder, device=chosen, dtype=dtype, allow_pickle=allow_pickle)
        return cls(model, config, chosen)

    @classmethod
    def from_numpy(cls, config: CLIPConfig, tensors: dict[str, np.ndarray], device=None) -> "TorchBackend":
        chosen = select_device(device)
        model = build_model(config)
        model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()})
        return cls(model.to(chosen), config, chosen)

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.inference_mode()
    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).permute(0, 3, 1, 2)
        batch = batch.to(self.device, self._dtype())
        size = self.config.vision_config.image_size
        interpolate = tuple(batch.shape[-2:]) != (size, size)
        features = self.model.get_image_features(pixel_values=batch, interpolate_pos_encoding=interpolate)
        return _normalized_numpy(features.pooler_output)

    @torch.inference_mode()
    def encode_texts(self, token_ids: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(np.asarray(token_ids, dtype=np.int64)).to(self.device)
        return _normalized_numpy(self.model.get_text_features(input_ids=ids).pooler_output)

    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        self.model.save_pretrained(folder, safe_serialization=True)
        return folder

    def state_numpy(self) -> dict[str, np.ndarray]:
        return {k: v.detach().float().cpu().numpy() for k, v in self.model.state_dict().items()}

    def memory(self) -> dict[str, int]:
        if self.device.type == "cuda":
            return {"peak_bytes": int(torch.cuda.max_memory_allocated(self.device)),
                    "active_bytes": int(torch.cuda.memory_allocated(self.device))}
        if self.device.type == "mps":
            return {"active_bytes": int(torch.mps.current_allocated_memory())}
        import resource

        return {"peak_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}


def _normalized_numpy(features: torch.Tensor) -> np.ndarray:
    features = features.float()
    return (features / features.norm(dim=-1, keepdim=True)).cpu().numpy()
