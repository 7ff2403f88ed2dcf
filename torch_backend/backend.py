"""The PyTorch engine behind the `Backend` protocol (`mlx_clip/engine/protocol.py`): the twin of
`mlx_clip/mlx_backend/backend.py`, on `transformers.CLIPModel`."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from mlx_clip.convert.writer import write_model_folder
from mlx_clip.engine.base import (ANCHOR, EMA, MODEL, OPTIM, PROBE_FLAG, STATE_FILE, EngineBase, Training, prefixed,
                                  unprefixed)
from mlx_clip.model.config import CLIPConfig
from mlx_clip.torch_backend.lora import merged
from mlx_clip.torch_backend.model import image_features, load_torch_model, pixels_tensor, select_device

class TorchBackend(EngineBase):
    name = "torch"

    def __init__(self, model, config: CLIPConfig, device: torch.device):
        self.model, self.config, self.device = model.eval(), config, device

    @staticmethod
    def describe() -> str:
        return f"torch {torch.__version__}: auto device {select_device(None)}, {torch.get_num_threads()} threads"

    @classmethod
    def matmul_runner(cls, size: int, dtype: str = "float32"):
        """On the CPU: torch's matmul returns when the product is done. Through `F.linear`, as the
        model's layers run: on a CPU without bfloat16 instructions torch's bfloat16 `a @ b` takes a
        slow path that Linear does not (AMD EPYC, AVX2, n=512: 1.3 GFLOP/s against 12-19 through
        Linear; float32 the same either way)."""
        a, b = (torch.randn(size, size, dtype=getattr(torch, dtype)) for _ in range(2))
        return lambda: torch.nn.functional.linear(a, b)

    @classmethod
    def select_device(cls, requested: str | None) -> torch.device:
        return select_device(requested)

    @classmethod
    def load(cls, folder, device, *, dtype, allow_pickle, image_size, quantize=None) -> "TorchBackend":
        from mlx_clip.convert.checkpoint import quantization_of, quantized_refusal
        from mlx_clip.errors import ConfigError

        stored = quantization_of(folder)
        if stored is not None:  # before torch reads anything: transformers has no MLX-quantized layers
            raise ConfigError(quantized_refusal(folder, stored, "the torch engine (--backend torch) runs float weights",
                                                "use --backend mlx, or give the float folder they were quantized from"))
        model, config = load_torch_model(folder, device=device, dtype=dtype, allow_pickle=allow_pickle,
                                         image_size=image_size)
        return cls(model, config, device)

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # --- inference --------------------------------------------------------------------------
    @torch.inference_mode()
    def _in_eval_mode(self, encode, inputs: torch.Tensor) -> np.ndarray:
        """Encoding mid-training sees the model in eval mode, then hands it back as it was."""
        was_training = self.model.training
        self.model.eval()
        try:
            features = encode(inputs).pooler_output.float()
        finally:
            self.model.train(was_training)
        return (features / features.norm(dim=-1, keepdim=True)).cpu().numpy()

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        batch = self._pixels(pixels)
        return self._in_eval_mode(lambda x: image_features(self.model, x), batch)

    def _pixels(self, pixels: np.ndarray) -> torch.Tensor:
        """On the device, in the model's dtype (NaFlex's packed patches stay float32: `pixels_tensor`)."""
        batch = pixels_tensor(pixels, self.config)
        return batch.to(self.device) if self.config.is_naflex else batch.to(self.device, self._dtype())

    def encode_texts(self, token_ids: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(np.asarray(token_ids, dtype=np.int64)).to(self.device)
        return self._in_eval_mode(lambda x: self.model.get_text_features(input_ids=x), ids)

    def save(self, folder: str | Path, *, to: str | None = None) -> Path:
        """A plain model folder (LoRA merged) that both engines and, for "hf", transformers load;
        Hugging Face layout by default."""
        tensors = {k: v.detach().float().cpu().numpy() for k, v in merged(self.model).state_dict().items()}
        return write_model_folder(Path(folder), self.config, tensors, to=to or "hf", source=self.source)

    def export_onnx(self, folder: Path, pixels: np.ndarray, token_ids: np.ndarray, *, opset: int,
                    image_file: str, text_file: str) -> dict:
        """The two towers as ONNX graphs in `folder` (see `torch_backend/export.py`), traced on
        the example batch; returns the exporter's name and the logit scale."""
        from mlx_clip.torch_backend.export import export_towers

        return export_towers(self.model, Path(folder), pixels, token_ids, opset=opset, image_file=image_file,
                             text_file=text_file)

    def memory(self) -> dict[str, int]:
        if self.device.type == "cuda":
            return {"peak_bytes": int(torch.cuda.max_memory_allocated(self.device)),
                    "active_bytes": int(torch.cuda.memory_allocated(self.device))}
        if self.device.type == "mps":
            return {"active_bytes": int(torch.mps.current_allocated_memory())}
        import resource

        return {"peak_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}

    # --- training ---------------------------------------------------------------------------
    def start_training(self) -> Training:
        from mlx_clip.torch_backend.train import prepare

        return prepare(self.model, self.train_config, self.plan, self.device, self.world)

    def enter_phase(self, phase: str) -> Training:
        from mlx_clip.torch_backend.train import enter_phase

        training = self.training
        return enter_phase(training.module, self.train_config, self.plan, phase, training.anchors, self.device,
                           training.scaler, self.world, training.ema)

    def join(self) -> None:
        """Under torchrun (WORLD_SIZE > 1), join the process group; on CUDA each rank takes the
        GPU of its LOCAL_RANK."""
        import os

        from mlx_clip.engine.distributed import Watchdog, launched, timeout_s
        from mlx_clip.torch_backend.distributed import join

        world = launched("torch")
        if world is None:
            return
        if self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
            self.model.to(self.device)
        join(world, self.device, timeout_s())
        self.world, self.watchdog = world, Watchdog(world, timeout_s() + 30)  # gloo's own timeout first

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any (one process: `flag`)."""
        if self.world.size == 1:
            return flag
        from mlx_clip.torch_backend.distributed import any_rank

        return any_rank(flag, self.world, self.device)

    def rank_sum(self, values: np.ndarray) -> np.ndarray:
        """The element-wise sum of a small int vector over the ranks (one process: `values`)."""
        if self.world.size == 1:
            return np.asarray(values)
        from mlx_clip.torch_backend.distributed import rank_sum

        return rank_sum(values, self.world, self.device)

    def _trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        from mlx_clip.torch_backend.train import trainable

        return trainable(self.training.module)

    def trainable_count(self) -> int:
        return sum(p.numel() for _, p in self._trainable())

    def parameter_sizes(self, trainable: bool = True) -> dict[str, int]:
        named = self._trainable() if trainable else self.training.module.named_parameters()
        return {name: p.numel() for name, p in named}

    @contextmanager
    def ema_weights(self):
        """The weights' moving average in the model, in the model's dtypes, for the duration; the
        trained tensors themselves (which the optimizer state is keyed on) come back afterwards."""
        params = dict(self.training.module.named_parameters())
        trained = {name: params[name].data for name in self.training.ema}
        for name, average in self.training.ema.items():
            params[name].data = average.to(trained[name].dtype, copy=True)
        try:
            yield
        finally:
            for name, data in trained.items():
                params[name].data = data

    def train_step(self, batch, lr: float) -> dict:
        rows = self.world.shard(len(batch.input_ids))  # this rank's slice; the labels stay global
        pixels = self._pixels(batch.pixels_of(rows))
        ids = torch.from_numpy(batch.input_ids[rows].astype(np.int64)).to(self.device)
        labels = torch.from_numpy(batch.positive_ids.astype(np.int64)).to(self.device)
        keep = None if batch.patch_keep is None else torch.from_numpy(batch.patch_keep[rows].astype(np.int64)).to(self.device)
        negative_ids = negative_mask = None
        if batch.negative_ids is not None:  # this rank's rows; the mask, like the labels, is global
            negative_ids = torch.from_numpy(batch.negative_ids[rows].astype(np.int64)).to(self.device)
            negative_mask = torch.from_numpy(batch.negative_mask).to(self.device)
        if self.watchdog:
            self.watchdog.start("a training step")
        loss, norm, ok = self.training.step(pixels, ids, labels, lr, keep, negative_ids, negative_mask)
        if self.watchdog:
            self.watchdog.stop()
        return {"loss": float(loss), "grad_norm": float(norm), "ok": ok,
                "logit_scale": float(self.model.logit_scale.detach().exp())}

    def save_state(self, folder: Path) -> None:
        from safetensors.torch import save_file

        training = self.training
        tensors = {**prefixed(MODEL, ((k, v.detach().contiguous()) for k, v in training.module.state_dict().items())),
                   **prefixed(ANCHOR, ((k, v.contiguous()) for k, v in (training.anchors or {}).items())),
                   **prefixed(EMA, ((k, v.contiguous()) for k, v in (training.ema or {}).items()))}
        if self.phased:  # LP-FT: the phase decides which optimizer state there is
            tensors[PROBE_FLAG] = torch.tensor(self.phase == "probe", dtype=torch.uint8)
        if training.scaler is not None:
            state = training.scaler.state_dict()
            tensors["scaler/scale"] = torch.tensor(state["scale"], dtype=torch.float64)
            tensors["scaler/growth_tracker"] = torch.tensor(state["_growth_tracker"], dtype=torch.int64)
        for name, param in self._trainable():
            for key, value in training.optimizer.state.get(param, {}).items():
                tensors[f"{OPTIM}{name}.{key}"] = value.detach().contiguous()
        save_file({k: v.cpu() for k, v in tensors.items()}, str(Path(folder) / STATE_FILE),
                  metadata={"engine": "torch"})

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return prefixed(MODEL, ((k, tuple(v.shape)) for k, v in self.training.module.state_dict().items()))

    def load_state(self, folder: Path) -> None:
        from safetensors.torch import load_file

        tensors = load_file(str(Path(folder) / STATE_FILE))
        if PROBE_FLAG in tensors:  # first, since the optimizer state's shape follows the phase
            self.set_phase("probe" if int(tensors[PROBE_FLAG]) else "full")
        training = self.training
        with torch.no_grad():
            saved = unprefixed(ANCHOR, tensors)
            for name, anchor in (training.anchors or {}).items():
                anchor.copy_(saved[name])
            saved = unprefixed(EMA, tensors)
            for name, average in (training.ema or {}).items():
                average.copy_(saved[name])
        scaler = training.scaler
        if scaler is not None and "scaler/scale" in tensors:
            scaler.load_state_dict({**scaler.state_dict(), "scale": float(tensors["scaler/scale"]),
                                    "_growth_tracker": int(tensors["scaler/growth_tracker"])})
        training.module.load_state_dict(unprefixed(MODEL, tensors))
        saved = unprefixed(OPTIM, tensors)
        for name, param in self._trainable():
            state = {key: saved[f"{name}.{key}"].to(self.device)
                     for key in ("step", "exp_avg", "exp_avg_sq") if f"{name}.{key}" in saved}
            if state:
                state["step"] = state["step"].cpu()  # AdamW keeps step on CPU unless capturable
                training.optimizer.state[param] = state
