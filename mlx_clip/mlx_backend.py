"""The MLX engine: loads any supported checkpoint folder into `mlx_clip.model.CLIPModel`,
encodes numpy batches, saves in MLX layout."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path, tree_unflatten

from convert.layout import mlx_to_torch, torch_to_mlx
from convert.writer import mlx_metadata
from mlx_clip.config import CLIPConfig
from mlx_clip.errors import ConfigError
from mlx_clip.model import CLIPModel, init_weights, normalize

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def mlx_dtype(name: str | None):
    if name is None:
        return mx.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}") from None


MLX_DEVICES = ("auto", "cpu", "gpu")


def select_device(requested: str | None = None, *, gpu_available: bool | None = None) -> str:
    """MLX on a Mac uses the GPU through Metal; its Linux CPU build has only the CPU.

    `gpu_available` exists so the selection logic can be tested on a machine without Metal."""
    gpu = mx.metal.is_available() if gpu_available is None else gpu_available
    choice = (requested or "auto").lower()
    if choice not in MLX_DEVICES:
        raise ConfigError(f"--device must be one of {', '.join(MLX_DEVICES)} for the MLX engine, got {requested!r}")
    if choice == "auto":
        return "gpu" if gpu else "cpu"
    if choice == "gpu" and not gpu:
        raise ConfigError("--device gpu: this MLX build has no GPU (Metal is not available)")
    return choice


def load_mlx_model(folder: str | Path, *, dtype: str | None = None, allow_pickle: bool = False) -> CLIPModel:
    from convert import read_checkpoint

    checkpoint = read_checkpoint(folder, allow_pickle=allow_pickle)
    model = CLIPModel(checkpoint.config)
    weights = [(name, mx.array(torch_to_mlx(name, array))) for name, array in checkpoint.tensors.items()]
    model.load_weights(weights, strict=True)
    if dtype is not None and dtype != "float32":
        model.set_dtype(mlx_dtype(dtype))
    mx.eval(model.parameters())
    return model


def save_mlx_model(model: CLIPModel, folder: str | Path, metadata: dict[str, str] | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save(folder)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={**mlx_metadata(), **(metadata or {})})
    return folder


def torch_layout_numpy(model: CLIPModel) -> dict[str, np.ndarray]:
    """Parameters as numpy in torch layout (float32), for engines and converters that need it."""
    return {name: mlx_to_torch(name, np.array(value.astype(mx.float32)))
            for name, value in tree_flatten(model.parameters())}


class MLXBackend:
    name = "mlx"

    def __init__(self, model: CLIPModel, device: str | None = None):
        mx.set_default_device(mx.gpu if select_device(device) == "gpu" else mx.cpu)
        self.model = model
        self.config: CLIPConfig = model.config
        self.model.eval()

    @classmethod
    def from_folder(cls, folder, *, dtype=None, allow_pickle=False, device=None) -> "MLXBackend":
        return cls(load_mlx_model(folder, dtype=dtype, allow_pickle=allow_pickle), device=device)

    @classmethod
    def random(cls, config: CLIPConfig, seed: int = 0) -> "MLXBackend":
        model = CLIPModel(config)
        init_weights(model, seed)
        return cls(model)

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        features = self.model.get_image_features(mx.array(pixels))
        out = normalize(features.astype(mx.float32))
        return np.array(out)

    def encode_texts(self, token_ids: np.ndarray) -> np.ndarray:
        features = self.model.get_text_features(mx.array(np.asarray(token_ids, dtype=np.int32)))
        return np.array(normalize(features.astype(mx.float32)))

    def save(self, folder: str | Path) -> Path:
        return save_mlx_model(self.model, folder)

    def memory(self) -> dict[str, int]:
        return {"peak_bytes": int(mx.get_peak_memory()), "active_bytes": int(mx.get_active_memory()),
                "cache_bytes": int(mx.get_cache_memory())}


class TrainModule(nn.Module):
    """What the optimizer sees: the CLIP, plus SigLIP's learnable bias when that loss is used.
    Parameter names ("clip.…", "logit_bias") are the same in the torch engine's state."""

    def __init__(self, clip: CLIPModel, logit_bias: float | None):
        super().__init__()
        self.clip = clip
        if logit_bias is not None:
            self.logit_bias = mx.array(logit_bias, dtype=mx.float32)

    def bias(self):
        return self["logit_bias"] if "logit_bias" in self else None


class MLXTrainEngine:
    """One compiled AdamW step over model and optimizer state (mlx-lm's pattern). The step draws no
    random numbers (augmentation is seeded on the numpy side), so no RNG state is captured."""

    name = "mlx"

    def __init__(self, model: CLIPModel, cfg):
        from mlx_clip.loss import LOSSES
        from mlx_clip.schedule import LOGIT_SCALE_MAX, decays

        self.cfg = cfg
        self.config: CLIPConfig = model.config
        self.module = TrainModule(model, -10.0 if cfg.loss == "siglip" else None)
        apply_strategy(self.module, cfg)
        model.set_gradient_checkpointing(cfg.gradient_checkpointing)
        self.optimizer = optim.Adam(learning_rate=0.0, betas=[cfg.beta1, cfg.beta2], eps=cfg.eps,
                                    bias_correction=True)  # torch's AdamW corrects bias; MLX's default doesn't
        trainable = self.module.trainable_parameters()
        self.optimizer.init(trainable)
        self.decay_mask = dict(tree_flatten(tree_map_with_path(lambda path, p: decays(path, p.ndim), trainable)))
        loss_fn = LOSSES[cfg.loss]
        options = {} if cfg.loss == "siglip" else {"label_smoothing": cfg.label_smoothing,
                                                    "hard_negative_beta": cfg.hard_negative_beta}

        def compute_loss(module, pixels, ids, labels):
            image = normalize(module.clip.get_image_features(pixels))
            text = normalize(module.clip.get_text_features(ids))
            return loss_fn(image, text, mx.exp(module.clip.logit_scale), module.bias(), labels=labels, **options)

        loss_and_grad = nn.value_and_grad(self.module, compute_loss)
        state = [self.module.state, self.optimizer.state]

        def step(pixels, ids, labels, lr):
            loss, grads = loss_and_grad(self.module, pixels, ids, labels)
            flat = tree_flatten(grads)
            grads = tree_unflatten(flat)  # drops the empty branches of frozen towers
            norm = mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in flat))
            if cfg.grad_clip > 0:  # as torch.nn.utils.clip_grad_norm_: always scale by min(1, c/(n+1e-6))
                coef = mx.minimum(cfg.grad_clip / (norm + 1e-6), 1.0)
                grads = tree_map(lambda g: (g * coef).astype(g.dtype), grads)
            ok = mx.isfinite(loss) & mx.isfinite(norm)
            old_params = dict(tree_flatten(self.module.trainable_parameters()))
            # apply_gradients mutates the optimizer's dict in place: keep the old arrays aside.
            old_state = dict(tree_flatten(self.optimizer.state))
            decayed = tree_unflatten([(k, p * (1 - lr * cfg.weight_decay) if self.decay_mask[k] else p)
                                      for k, p in old_params.items()])
            self.optimizer.learning_rate = lr
            new_params = dict(tree_flatten(self.optimizer.apply_gradients(grads, decayed)))
            if "clip.logit_scale" in new_params:
                new_params["clip.logit_scale"] = mx.clip(new_params["clip.logit_scale"], 0.0, LOGIT_SCALE_MAX)
            # A non-finite step changes nothing: parameters and optimizer moments stay as they were.
            self.module.update(tree_unflatten([(k, mx.where(ok, v, old_params[k])) for k, v in new_params.items()]))
            kept = [(k, mx.where(ok, v, old_state[k]) if k in old_state else v)
                    for k, v in tree_flatten(self.optimizer.state)]
            # Updated in place: the compiled function captures this dict object, not the name.
            self.optimizer.state.update(tree_unflatten(kept))
            return loss, norm, ok

        self._step = mx.compile(step, inputs=state, outputs=state)

    @classmethod
    def from_folder(cls, folder, cfg) -> "MLXTrainEngine":
        return cls(load_mlx_model(folder, dtype=cfg.dtype), cfg)

    def train_step(self, batch, lr: float) -> dict:
        labels = batch.labels if batch.labels is not None else batch.image_ids
        loss, norm, ok = self._step(mx.array(batch.pixels), mx.array(batch.input_ids.astype(np.int32)),
                                    mx.array(labels.astype(np.int32)), mx.array(lr, dtype=mx.float32))
        mx.eval(loss, norm, ok, self.module.state, self.optimizer.state)
        return {"loss": float(loss), "grad_norm": float(norm), "ok": bool(ok),
                "logit_scale": float(mx.exp(self.module.clip.logit_scale))}

    def trainable_count(self) -> int:
        return sum(int(np.prod(p.shape)) for _, p in tree_flatten(self.module.trainable_parameters()))

    def encoder(self) -> MLXBackend:
        return MLXBackend(self.module.clip)

    def save_state(self, folder: Path) -> None:
        tensors = {f"model/{k}": v for k, v in tree_flatten(self.module.parameters())}
        tensors.update({f"optim/{k}": v for k, v in tree_flatten(self.optimizer.state)})
        mx.save_safetensors(str(Path(folder) / "engine_state.safetensors"), tensors, metadata={"engine": "mlx"})

    def load_state(self, folder: Path) -> None:
        tensors = mx.load(str(Path(folder) / "engine_state.safetensors"))
        self.module.update(tree_unflatten([(k[6:], v) for k, v in tensors.items() if k.startswith("model/")]))
        self.optimizer.state.update(tree_unflatten([(k[6:], v) for k, v in tensors.items() if k.startswith("optim/")]))
        mx.eval(self.module.state, self.optimizer.state)

    def save_model(self, folder: Path) -> Path:
        """Plain Hugging Face folder (LoRA merged): loads in transformers and in both engines."""
        from mlx_clip.builtin import write_hf_folder

        clip = self.module.clip
        if self.cfg.strategy == "lora":
            import copy

            from mlx_clip.lora import merge_lora

            clip = copy.deepcopy(clip)
            merge_lora(clip)
        return write_hf_folder(Path(folder), clip.config, torch_layout_numpy(clip))

    def memory(self) -> dict[str, int]:
        return {"peak_bytes": int(mx.get_peak_memory()), "active_bytes": int(mx.get_active_memory())}


def apply_strategy(module: TrainModule, cfg) -> None:
    clip = module.clip
    if cfg.strategy == "lora":
        from mlx_clip.lora import apply_lora

        apply_lora(clip, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                   targets=[t.strip() for t in cfg.lora_targets.split(",") if t.strip()], seed=cfg.seed)
        clip.unfreeze(keys=["logit_scale"], recurse=False)
    elif cfg.strategy == "lock-image":
        clip.vision_model.freeze()
        clip.visual_projection.freeze()
    elif cfg.strategy == "lock-text":
        clip.text_model.freeze()
        clip.text_projection.freeze()
