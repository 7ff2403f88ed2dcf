"""The PyTorch engine behind the Backend protocol (mirrors `mlx_clip/mlx_backend.py`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mlx_clip.config import CLIPConfig
from torch_backend.model import load_torch_model, select_device


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

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        self.model.save_pretrained(folder, safe_serialization=True)
        return folder

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


class TrainModule(torch.nn.Module):
    """Mirror of `mlx_clip.mlx_backend.TrainModule`: the CLIP plus SigLIP's bias, same names."""

    def __init__(self, clip, logit_bias: float | None):
        super().__init__()
        self.clip = clip
        self.logit_bias = None if logit_bias is None else torch.nn.Parameter(torch.tensor(logit_bias))


class TorchTrainEngine:
    name = "torch"

    def __init__(self, model, config: CLIPConfig, device: torch.device, cfg):
        from mlx_clip.schedule import decays
        from torch_backend.loss import LOSSES

        self.cfg, self.config, self.device = cfg, config, device
        self.module = TrainModule(model, -10.0 if cfg.loss == "siglip" else None).to(device)
        apply_strategy(self.module, cfg)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.module.train()
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        self.trainable = named
        groups = [{"params": [p for n, p in named if decays(n, p.ndim)], "weight_decay": cfg.weight_decay},
                  {"params": [p for n, p in named if not decays(n, p.ndim)], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=0.0, betas=(cfg.beta1, cfg.beta2),
                                           eps=cfg.eps, foreach=False)
        self.loss_fn = LOSSES[cfg.loss]
        self.loss_options = {} if cfg.loss == "siglip" else {"label_smoothing": cfg.label_smoothing,
                                                              "hard_negative_beta": cfg.hard_negative_beta}

    @classmethod
    def from_folder(cls, folder, cfg) -> "TorchTrainEngine":
        device = select_device(cfg.device)
        model, config = load_torch_model(folder, device=device, dtype=cfg.dtype)
        return cls(model, config, device, cfg)

    def train_step(self, batch, lr: float) -> dict:
        from mlx_clip.schedule import LOGIT_SCALE_MAX

        for group in self.optimizer.param_groups:
            group["lr"] = lr
        labels = batch.labels if batch.labels is not None else batch.image_ids
        clip = self.module.clip
        pixels = torch.from_numpy(batch.pixels).permute(0, 3, 1, 2).to(self.device, next(clip.parameters()).dtype)
        ids = torch.from_numpy(batch.input_ids.astype(np.int64)).to(self.device)
        image = clip.get_image_features(pixel_values=pixels).pooler_output
        text = clip.get_text_features(input_ids=ids).pooler_output
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        loss = self.loss_fn(image, text, clip.logit_scale.exp(), self.module.logit_bias,
                            labels=torch.from_numpy(labels.astype(np.int64)).to(self.device), **self.loss_options)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for _, p in self.trainable]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf"))
        ok = bool(torch.isfinite(loss) and torch.isfinite(norm))
        if ok:  # a non-finite step changes nothing
            self.optimizer.step()
            with torch.no_grad():
                clip.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        return {"loss": float(loss.detach()), "grad_norm": float(norm), "ok": ok,
                "logit_scale": float(clip.logit_scale.detach().exp())}

    def trainable_count(self) -> int:
        return sum(p.numel() for _, p in self.trainable)

    def encoder(self) -> TorchBackend:
        return _EvalView(self.module.clip, self.config, self.device)

    def save_state(self, folder: Path) -> None:
        from safetensors.torch import save_file

        tensors = {f"model/{k}": v.detach().contiguous() for k, v in self.module.state_dict().items()}
        for name, param in self.trainable:
            for key, value in self.optimizer.state.get(param, {}).items():
                tensors[f"optim/{name}.{key}"] = value.detach().contiguous()
        save_file({k: v.cpu() for k, v in tensors.items()}, str(Path(folder) / "engine_state.safetensors"),
                  metadata={"engine": "torch"})

    def load_state(self, folder: Path) -> None:
        from safetensors.torch import load_file

        tensors = load_file(str(Path(folder) / "engine_state.safetensors"))
        self.module.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
        for name, param in self.trainable:
            state = {key: tensors[f"optim/{name}.{key}"].to(self.device)
                     for key in ("step", "exp_avg", "exp_avg_sq") if f"optim/{name}.{key}" in tensors}
            if state:
                state["step"] = state["step"].cpu()  # AdamW keeps step on CPU unless capturable
                self.optimizer.state[param] = state

    def save_model(self, folder: Path) -> Path:
        import copy

        from mlx_clip.builtin import write_hf_folder

        clip = self.module.clip
        if self.cfg.strategy == "lora":
            from torch_backend.lora import merge_lora

            clip = copy.deepcopy(clip)
            merge_lora(clip)
        tensors = {k: v.detach().float().cpu().numpy() for k, v in clip.state_dict().items()}
        return write_hf_folder(Path(folder), self.config, tensors)

    def memory(self) -> dict[str, int]:
        return TorchBackend.memory(self)  # type: ignore[arg-type]


class _EvalView(TorchBackend):
    """The training model seen as an inference engine, without copying it."""

    def __init__(self, model, config, device):
        self.model, self.config, self.device = model, config, device

    def _in_eval_mode(self, encode, inputs):
        was_training = self.model.training
        self.model.eval()
        try:
            return encode(self, inputs)
        finally:
            self.model.train(was_training)

    def encode_images(self, pixels):
        return self._in_eval_mode(TorchBackend.encode_images, pixels)

    def encode_texts(self, token_ids):
        return self._in_eval_mode(TorchBackend.encode_texts, token_ids)


def apply_strategy(module: TrainModule, cfg) -> None:
    clip = module.clip
    if cfg.strategy == "lora":
        from torch_backend.lora import apply_lora

        apply_lora(clip, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                   targets=[t.strip() for t in cfg.lora_targets.split(",") if t.strip()], seed=cfg.seed)
        clip.logit_scale.requires_grad_(True)
    elif cfg.strategy == "lock-image":
        for part in (clip.vision_model, clip.visual_projection):
            part.requires_grad_(False)
    elif cfg.strategy == "lock-text":
        for part in (clip.text_model, clip.text_projection):
            part.requires_grad_(False)
