"""The MLX engine behind the `Backend` protocol (`mlx_clip/engine/protocol.py`): loads any supported
checkpoint folder into `model.CLIPModel` (or `siglip.SiglipModel`), encodes numpy batches, trains with the compiled step of
`train.py`, saves plain model folders. `torch_backend/backend.py` is its twin."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_clip.convert.layout import mlx_to_torch, torch_to_mlx
from mlx_clip.convert.writer import mlx_metadata, write_model_folder, write_side_files
from mlx_clip.model.config import CLIPConfig
from mlx_clip.model.naflex import check_packed
from mlx_clip.engine.base import MODEL, OPTIM, PROBE_FLAG, STATE_FILE, EngineBase, Training, prefixed, unprefixed
from mlx_clip.mlx_backend import runtime
from mlx_clip.mlx_backend.runtime import configure
from mlx_clip.mlx_backend.lora import merged
from mlx_clip.mlx_backend.model import CLIPModel, init_weights, normalize
from mlx_clip.mlx_backend.parallel import BatchSplit
from mlx_clip.mlx_backend.siglip import SiglipModel
from mlx_clip.mlx_backend.siglip2 import Siglip2Model
from mlx_clip.engine.policy import check_dtype, choose_device

def mlx_dtype(name: str | None):
    return getattr(mx, check_dtype(name))


def select_device(requested: str | None = None, *, gpu_available: bool | None = None) -> str:
    """MLX's GPU is Metal on a Mac and CUDA with Linux's `mlx[cuda]` build; its `mlx[cpu]` build
    has only the CPU.

    `gpu_available` exists so the selection logic can be tested on a machine without a GPU."""
    gpu = (mx.metal.is_available() or mx.cuda.is_available()) if gpu_available is None else gpu_available
    return choose_device(requested, "mlx", {"gpu": gpu})



def build_model(config: CLIPConfig) -> CLIPModel | SiglipModel | Siglip2Model:
    """The MLX model of `config`'s family (all have the same interface; NaFlex's images are packed
    patches, `naflex.pack`)."""
    if config.is_naflex:
        return Siglip2Model(config)
    return SiglipModel(config) if config.is_siglip else CLIPModel(config)


def load_mlx_model(folder: str | Path, *, dtype: str | None = None, allow_pickle: bool = False,
                   image_size: int | None = None, quantize: int | None = None) -> CLIPModel:
    """The model in `folder`; with `quantize`, its Linears quantized to that many bits
    (`quantize.py`). A folder saved quantized loads quantized, as it was written."""
    from mlx_clip.convert import read_checkpoint
    from mlx_clip.convert.checkpoint import quantization_of
    from mlx_clip.convert.resolution import at_image_size
    from mlx_clip.mlx_backend import quantize as quantization

    stored = quantization_of(folder)
    if stored is not None:
        quantization.check_requantize(Path(folder), stored, quantize)
        config, weights = quantization.read_quantized(folder, image_size)
        model = quantization.load_quantized(build_model(config), weights, str(folder))
    else:
        checkpoint = at_image_size(read_checkpoint(folder, allow_pickle=allow_pickle), image_size)
        model = build_model(checkpoint.config)
        weights = [(name, mx.array(torch_to_mlx(name, array))) for name, array in checkpoint.tensors.items()]
        model.load_weights(weights, strict=True)
    if check_dtype(dtype) != "float32":
        model.set_dtype(mlx_dtype(dtype))  # integers stay packed: set_dtype casts floating arrays only
    if quantize is not None and stored is None:
        quantization.quantize_model(model, quantize)  # after the cast: scales take the compute dtype
    mx.eval(model.parameters())
    return model


def save_mlx_model(model: CLIPModel, folder: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """config.json + model.safetensors in MLX's layout, written by MLX's own safetensors writer."""
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


class MLXBackend(EngineBase):
    name = "mlx"
    group = None  # the mx.distributed group of the processes training together

    def __init__(self, model: CLIPModel, device: str = "cpu"):
        configure(device)  # the default device, the allocator's cache, the kernel compiler's flags
        self.model = model.eval()
        self.config: CLIPConfig = model.config
        self.split = BatchSplit()
        # Compiled once (per input shape, by MLX), with the weights as inputs rather than baked-in
        # constants, so that encoding in the middle of training sees the current weights.
        state = self.model.state

        def features(tower):
            return mx.compile(lambda x: normalize(self.split(tower, x).astype(mx.float32)), inputs=state)

        self._image_features = features(lambda x: self.model.get_image_features(x))
        self._text_features = features(lambda x: self.model.get_text_features(x))

    @staticmethod
    def describe() -> str:
        return f"mlx {mx.__version__}: default device {mx.default_device()}; runtime: {runtime.describe()}"

    @classmethod
    def matmul_runner(cls, size: int, dtype: str = "float32"):
        a, b = (mx.random.normal((size, size)).astype(mlx_dtype(dtype)) for _ in range(2))
        mx.eval(a, b)
        return lambda: mx.eval(a @ b)

    @classmethod
    def select_device(cls, requested: str | None) -> str:
        return select_device(requested)

    @classmethod
    def load(cls, folder, device, *, dtype, allow_pickle, image_size, quantize=None) -> "MLXBackend":
        model = load_mlx_model(folder, dtype=dtype, allow_pickle=allow_pickle, image_size=image_size,
                               quantize=quantize)
        engine = QuantizedMLXBackend if model.config.quantization is not None else cls
        return engine(model, device)

    @classmethod
    def random(cls, config: CLIPConfig, seed: int = 0) -> "MLXBackend":
        model = build_model(config)
        init_weights(model, seed)
        return cls(model)

    # --- inference --------------------------------------------------------------------------
    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        if self.config.is_naflex:  # square pixels would fail deep inside the tower
            check_packed(pixels, self.config.vision_config.patch_dim)
        with self.split.evaluating(len(pixels)):
            return np.array(self._image_features(mx.array(pixels)))

    def encode_texts(self, token_ids: np.ndarray) -> np.ndarray:
        with self.split.evaluating(len(token_ids)):
            return np.array(self._text_features(mx.array(np.asarray(token_ids, dtype=np.int32))))

    def save(self, folder: str | Path, *, to: str | None = None) -> Path:
        """A plain model folder (LoRA merged) that both engines and, for "hf", transformers load;
        MLX's own layout by default."""
        model = merged(self.model)
        if to in (None, "mlx"):
            save_mlx_model(model, folder)
            write_side_files(Path(folder), self.config, self.source)
            return Path(folder)
        return write_model_folder(Path(folder), self.config, torch_layout_numpy(model), to=to, source=self.source)

    def memory(self) -> dict[str, int]:
        return {"peak_bytes": int(mx.get_peak_memory()), "active_bytes": int(mx.get_active_memory())}

    # --- training ---------------------------------------------------------------------------
    def start_training(self) -> Training:
        from mlx_clip.mlx_backend.train import prepare

        return prepare(self.model, self.train_config, self.plan, self.split, self.group)

    def enter_phase(self, phase: str) -> Training:
        from mlx_clip.mlx_backend.train import enter_phase

        state = self.training.optimizer.state
        return enter_phase(self.training.module, self.train_config, self.plan, phase, state.get("anchor"), self.split,
                           self.group, state.get("ema"))

    def join(self) -> None:
        """Under mlx.launch (MLX_RANK set), join the group its backend describes (ring, MPI, NCCL)."""
        from mlx_clip.engine.distributed import Watchdog, World, launched, peer_lost, timeout_s

        launch = launched("mlx")
        if launch is None:
            return
        try:
            group = mx.distributed.init(strict=True)
        except Exception as err:
            raise peer_lost(World(launch.rank, 0, launch.launcher), "joining the group", err) from None
        if group.size() > 1:
            self.group = group
            self.world = World(group.rank(), group.size(), launch.launcher)
            # The ring backend waits on its sockets without a timeout: the watchdog bounds a step.
            self.watchdog = Watchdog(self.world, timeout_s())

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any (one process: `flag`)."""
        if self.group is None:
            return flag
        self.watchdog.start("agreeing on whether to stop")
        agreed = self._collective(lambda: mx.distributed.all_sum(mx.array(int(flag)), group=self.group).item() > 0,
                                  "agreeing on whether to stop")
        self.watchdog.stop()
        return agreed

    def rank_sum(self, values: np.ndarray) -> np.ndarray:
        """The element-wise sum of a small int vector over the ranks (one process: `values`)."""
        if self.group is None:
            return np.asarray(values)
        what = "agreeing on which images decode"
        self.watchdog.start(what)
        summed = self._collective(lambda: np.array(mx.distributed.all_sum(
            mx.array(np.asarray(values, np.int32)), group=self.group)), what)
        self.watchdog.stop()
        return summed.astype(np.int64)

    def _collective(self, evaluate, what: str):
        from mlx_clip.engine.distributed import peer_lost

        try:
            return evaluate()
        except RuntimeError as err:  # the ring's socket closed: a peer is gone
            raise peer_lost(self.world, what, err) from None

    def trainable_count(self) -> int:
        return sum(int(np.prod(p.shape)) for _, p in tree_flatten(self.training.module.trainable_parameters()))

    def parameter_sizes(self, trainable: bool = True) -> dict[str, int]:
        module = self.training.module
        tree = module.trainable_parameters() if trainable else module.parameters()
        return {name: int(np.prod(p.shape)) for name, p in tree_flatten(tree)}

    @contextmanager
    def ema_weights(self):
        """The weights' moving average in the model, in the model's dtypes, for the duration; the
        trained weights (and the compiled step's state) come back untouched afterwards."""
        module = self.training.module
        averages = tree_flatten(self.training.optimizer.state["ema"])
        params = dict(tree_flatten(module.parameters()))
        trained = [(name, params[name]) for name, _ in averages]
        module.update(tree_unflatten([(name, value.astype(params[name].dtype)) for name, value in averages]))
        try:
            yield
        finally:
            module.update(tree_unflatten(trained))

    def train_step(self, batch, lr: float) -> dict:
        module, optimizer, step = self.training.module, self.training.optimizer, self.training.step
        # Feature caching takes the pixels as numpy and moves one micro-batch at a time into MLX
        # memory: a 1024-image batch never sits there whole.
        cached = bool(self.train_config.micro_batch_size)
        rows = self.world.shard(len(batch.input_ids))  # this rank's slice; the labels stay global
        pixels = batch.pixels_of(rows) if cached else mx.array(batch.pixels_of(rows))

        # Inputs only some runs have: patch dropout's draw and hard-negative captions (this rank's
        # rows; the negatives' mask, like the labels, is the global batch's).
        extras = {}
        if batch.patch_keep is not None:
            extras["keep"] = mx.array(batch.patch_keep[rows].astype(np.int32))
        if batch.negative_ids is not None:
            extras["negative_ids"] = mx.array(batch.negative_ids[rows].astype(np.int32))
            extras["negative_mask"] = mx.array(batch.negative_mask)

        def run():
            out = step(pixels, mx.array(batch.input_ids[rows].astype(np.int32)),
                       mx.array(batch.positive_ids.astype(np.int32)), mx.array(lr, dtype=mx.float32), extras)
            with self.split.evaluating():
                mx.eval(*out, module.state, optimizer.state)
            return out

        if self.group is None:
            loss, norm, ok = run()
        else:  # feature caching evaluates collectives inside the step: all of it is guarded
            self.watchdog.start("a training step")
            loss, norm, ok = self._collective(run, "a training step")
            self.watchdog.stop()
        return {"loss": float(loss), "grad_norm": float(norm), "ok": bool(ok),
                "logit_scale": float(mx.exp(self.model.logit_scale))}

    def save_state(self, folder: Path) -> None:
        module, optimizer = self.training.module, self.training.optimizer
        tensors = {**prefixed(MODEL, tree_flatten(module.parameters())),
                   **prefixed(OPTIM, tree_flatten(optimizer.state))}
        if self.phased:  # LP-FT: the phase decides which optimizer state there is
            tensors[PROBE_FLAG] = mx.array(self.phase == "probe", dtype=mx.uint8)
        mx.save_safetensors(str(Path(folder) / STATE_FILE), tensors, metadata={"engine": "mlx"})

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return prefixed(MODEL, ((k, tuple(v.shape)) for k, v in tree_flatten(self.training.module.parameters())))

    def load_state(self, folder: Path) -> None:
        tensors = mx.load(str(Path(folder) / STATE_FILE))
        if PROBE_FLAG in tensors:  # first, since the optimizer state's shape follows the phase
            self.set_phase("probe" if tensors[PROBE_FLAG].item() else "full")
        module, optimizer = self.training.module, self.training.optimizer
        module.update(tree_unflatten(list(unprefixed(MODEL, tensors).items())))
        # Leaf by leaf in the state's own order: the compiled step captured this tree and reads its
        # leaves by position, and the file's order is not the state's (a moment swapped with a
        # same-shaped one was read as the other: NaN from sqrt(m), seen with LP-FT's probe phase).
        saved = unprefixed(OPTIM, tensors)
        optimizer.state.update(tree_unflatten([(k, saved[k]) for k, _ in tree_flatten(optimizer.state)]))
        mx.eval(module.state, optimizer.state)


class QuantizedMLXBackend(MLXBackend):
    """The MLX engine holding quantized weights (`quantize.py`): it embeds, and saves them as a
    quantized MLX folder; it never trains (QLoRA is not supported: training stays float32)."""

    def prepare_training(self, cfg) -> None:
        from mlx_clip.convert.checkpoint import quantized_refusal
        from mlx_clip.errors import ConfigError

        raise ConfigError(quantized_refusal(self.source, self.config.quantization, "training stays float32",
                                            "fine-tune the float folder they were quantized from, then "
                                            "`mlxclip convert --quantize` the result"))

    def save(self, folder: str | Path, *, to: str | None = None) -> Path:
        if to in (None, "mlx"):
            return super().save(folder, to=to)
        from mlx_clip.errors import ConvertError
        from mlx_clip.model.config import describe_quantization

        raise ConvertError(f"--to {to}: the model's weights are MLX-quantized "
                           f"({describe_quantization(self.config.quantization)}) and {to} folders hold float weights; "
                           "save it as mlx, or save the float model it was quantized from")
