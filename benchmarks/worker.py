"""One measurement in a fresh interpreter, printed as one JSON line on stdout.

    python -m mlx_clip.benchmarks.worker TASK '{"size": "tiny", ...}'

Each row of `mlxclip bench` runs here on its own, so that one engine's threads, allocator caches and
peak memory never colour another's figures. Engines are reached through `mlx_clip.engine.protocol`; the peer
rows (open_clip's and transformers' own training steps) build what those users would run instead.
"""

from __future__ import annotations

import mlx_clip  # noqa: F401  (the BLAS loader runs before anything imports mlx)

import functools
import json
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mlx_clip.benchmarks.flops import train_flops_per_pair
from mlx_clip.api import resolve
from mlx_clip.engine.protocol import engine_class, load_backend
from mlx_clip.data.synthetic import synthetic_batch
from mlx_clip.training.options import TrainConfig

SIZES = {"tiny": "tiny", "b32": "vit-b32"}
TEXT_LENGTH = 77
SEED = 0


def timed(run: Callable[[], object], steps: int, warmup: int,
          sync: Callable[[], None] | None = None) -> tuple[list[float], list]:
    """`steps` timings of `run` after `warmup` untimed calls. `sync` waits for the device: CUDA and
    MPS return before their kernels finish, so without it the clock would time the launches."""
    sync = sync or (lambda: None)
    outputs = [run() for _ in range(warmup)]
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        outputs.append(run())
        sync()
        times.append(time.perf_counter() - start)
    return times, outputs


def torch_sync(device) -> Callable[[], None]:
    """What `timed` waits on for a torch `device` (nothing on the CPU, where ops return when done)."""
    import torch

    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def engine_sync(engine) -> Callable[[], None]:
    """`timed`'s `sync` for an engine's own calls (`inference` can pass it). MLX's `encode_*` and
    `train_step` hand back numpy arrays and floats, evaluated already, so only torch needs one."""
    return torch_sync(engine.device) if engine.name == "torch" else (lambda: None)


def torch_device_report(device) -> dict:
    """Where a torch row ran and, on CUDA, the most memory its tensors held there (the CPU rows'
    peak is the process's RSS, reported beside it)."""
    import torch

    if device.type != "cuda":
        return {"device": device.type}
    return {"device": f"cuda: {torch.cuda.get_device_name(device)}",
            "peak_gpu_bytes": int(torch.cuda.max_memory_allocated(device)),
            "tf32": bool(torch.backends.cuda.matmul.allow_tf32)}


def mlx_device_report() -> dict:
    """Where the MLX engine ran (`runtime.configure` set the default device) and its peak there."""
    import mlx.core as mx

    if mx.default_device() != mx.gpu:
        return {"device": "cpu"}
    name = mx.device_info(mx.default_device()).get("device_name", "unknown")
    return {"device": f"mlx gpu: {name}", "peak_gpu_bytes": int(mx.get_peak_memory())}


def device_report(engine: str, device=None) -> dict:
    """`torch_device_report` or `mlx_device_report` for engine `engine`; for torch without `device`,
    CUDA when this process used it."""
    if engine == "mlx":
        return mlx_device_report()
    import torch

    if device is None:
        device = torch.device("cuda" if torch.cuda.is_initialized() else "cpu")
    return torch_device_report(device)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train(args: dict) -> dict:
    folder = resolve(SIZES[args["size"]])
    # An explicit "device" fails the row where auto would fall back to the CPU unnoticed.
    engine = load_backend(args["engine"], folder, device=args.get("device"))
    cfg = TrainConfig(model=str(folder), backend=args["engine"], precision=args.get("precision", "fp32"),
                      lr=args.get("lr", 1e-5), warmup_steps=0)
    engine.prepare_training(cfg)
    batch = synthetic_batch(engine.config, args["batch_size"])
    times, metrics = timed(lambda: engine.train_step(batch, cfg.lr), args["steps"], args["warmup"],
                           engine_sync(engine))
    return {"seconds": times, "loss": metrics[-1]["loss"], "first_loss": metrics[0]["loss"],
            "memory": {**engine.memory(), "peak_rss_bytes": peak_rss()},
            "accelerator": device_report(engine.name, getattr(engine, "device", None)),
            "flops_per_image": train_flops_per_pair(engine.config, TEXT_LENGTH)}


def weight_bytes(engine) -> int:
    """Bytes of the engine's parameters as it holds them (a quantized model's packed integers,
    scales and biases, and what it keeps in float)."""
    params = engine.model.parameters()
    if isinstance(params, dict):  # MLX: a nested dict of arrays
        from mlx.utils import tree_flatten

        return sum(int(array.nbytes) for _, array in tree_flatten(params))
    return sum(p.numel() * p.element_size() for p in params)


def inference(args: dict) -> dict:
    """Throughput at the batch size, then a lone request's latency (batch 1, as a server answers
    one client): `latency_repeats` single images and single 77-token texts, each timed alone.
    With `quantize` (bits), the MLX engine's quantized Linears (`--quantize`)."""
    engine = load_backend(args["engine"], resolve(SIZES[args["size"]]), quantize=args.get("quantize"))
    batch = synthetic_batch(engine.config, args["batch_size"])
    images, _ = timed(lambda: engine.encode_images(batch.pixels), args["steps"], args["warmup"])
    texts, _ = timed(lambda: engine.encode_texts(batch.input_ids), args["steps"], args["warmup"])
    repeats = args.get("latency_repeats", 0)
    lone_image, lone_text = batch.pixels[:1], batch.input_ids[:1]
    image_latency, _ = timed(lambda: engine.encode_images(lone_image), repeats, 2)
    text_latency, _ = timed(lambda: engine.encode_texts(lone_text), repeats, 2)
    return {"image_seconds": images, "text_seconds": texts, "image_latency_seconds": image_latency,
            "text_latency_seconds": text_latency, "weight_bytes": weight_bytes(engine),
            "memory": {"peak_rss_bytes": peak_rss()}}


def _torch_peer_step(model, loss_of, lr: float, after: Callable[[], None] | None = None):
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.98),
                                  eps=1e-6, weight_decay=0.1)
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if after is not None:
            after()
        return float(loss.detach())

    return step


PEER_PRECISIONS = ("fp32", "amp_bf16")


def _peer_setup(args: dict):
    """The device the torch engine would pick (or `args["device"]`), so a peer runs where the
    engine it is compared with runs, and its autocast context for `args["precision"]`."""
    import torch

    from mlx_clip.engine.protocol import engine_class
    from mlx_clip.errors import ConfigError

    precision = args.get("precision", "fp32")
    if precision not in PEER_PRECISIONS:
        raise ConfigError(f"a peer row's precision must be one of {', '.join(PEER_PRECISIONS)}, got {precision!r}")
    device = engine_class("torch").select_device(args.get("device"))
    return device, functools.partial(torch.autocast, device.type, dtype=torch.bfloat16,
                                     enabled=precision == "amp_bf16")


def _peer_batch(config, batch_size: int, device):
    import torch

    batch = synthetic_batch(config, batch_size)
    pixels = torch.from_numpy(batch.pixels).permute(0, 3, 1, 2).contiguous().to(device)
    return pixels, torch.from_numpy(batch.input_ids).to(device)


def _config_of(folder):
    # On the CPU: a copy of the weights on the GPU would count in the peer's peak memory.
    return load_backend("torch", folder, device="cpu").config


def _peer_result(times: list[float], losses: list[float], config, device) -> dict:
    return {"seconds": times, "loss": losses[-1], "first_loss": losses[0], "memory": {"peak_rss_bytes": peak_rss()},
            "accelerator": torch_device_report(device), "flops_per_image": train_flops_per_pair(config, TEXT_LENGTH)}


def open_clip_peer(args: dict) -> dict:
    """open_clip's own step as `open_clip_train` runs it: `create_model`, `ClipLoss` under its autocast,
    AdamW, the logit-scale clamp after the update; on CUDA with TF32 matmuls, which its `main` turns
    on for every CUDA run (`"tf32": false` measures it without)."""
    import math

    import open_clip
    import torch

    from mlx_clip.conversion import convert

    device, autocast = _peer_setup(args)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.get("tf32", True)
        torch.backends.cudnn.benchmark = True
    folder = resolve(SIZES[args["size"]])
    with tempfile.TemporaryDirectory() as scratch:
        out = convert(folder, Path(scratch) / "open_clip", to="open_clip", verify=False)
        model = open_clip.create_model(f"local-dir:{out}").to(device)
    config = _config_of(folder)
    pixels, ids = _peer_batch(config, args["batch_size"], device)
    criterion = open_clip.ClipLoss()

    def loss_of():
        with autocast():
            image, text, scale = model(pixels, ids)[:3]
            return criterion(image, text, scale)

    def clamp():
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    step = _torch_peer_step(model, loss_of, args.get("lr", 1e-5), after=clamp)
    times, losses = timed(step, args["steps"], args["warmup"], torch_sync(device))
    return _peer_result(times, losses, config, device)


def transformers_peer(args: dict) -> dict:
    """A plain `transformers.CLIPModel` step (`return_loss=True`) with AdamW, float32 or bfloat16 autocast."""
    import transformers

    device, autocast = _peer_setup(args)
    folder = resolve(SIZES[args["size"]])
    model = transformers.CLIPModel.from_pretrained(folder, attn_implementation="sdpa").to(device)
    config = _config_of(folder)
    pixels, ids = _peer_batch(config, args["batch_size"], device)

    def loss_of():
        with autocast():
            return model(input_ids=ids, pixel_values=pixels, return_loss=True).loss

    times, losses = timed(_torch_peer_step(model, loss_of, args.get("lr", 1e-5)), args["steps"], args["warmup"],
                          torch_sync(device))
    return _peer_result(times, losses, config, device)


def data_pipeline(args: dict) -> dict:
    """Decode + seeded random resized crop + normalise, as the trainer's loader does, from JPEGs of
    a photo-like size (the known CLIP bottleneck is here, not in the model)."""
    from PIL import Image

    from mlx_clip.data.loader import BatchLoader
    from mlx_clip.data.sample import Sample
    from mlx_clip.model.tokenizer import load_tokenizer

    config = load_backend("torch", resolve(SIZES[args["size"]])).config
    rng = np.random.default_rng(SEED)
    with tempfile.TemporaryDirectory() as scratch:
        samples = []
        for i in range(args["images"]):
            path = Path(scratch) / f"{i}.jpg"
            base = rng.integers(0, 256, (args["source_size"] // 8, args["source_size"] // 8, 3), dtype=np.uint8)
            Image.fromarray(base).resize((args["source_size"],) * 2, Image.BICUBIC).save(path, quality=90)
            samples.append(Sample(path, f"a photo number {i}", None, i))
        tokenizer = load_tokenizer()
        loader = BatchLoader(samples, batch_size=args["batch_size"], image_size=config.vision_config.image_size,
                             tokenize=tokenizer.encode, seed=SEED, augment=True, num_workers=args["workers"],
                             decoded_cache_bytes=0)
        batches = max(1, args["images"] // args["batch_size"])
        loader.next_batch()  # threads up, first batch decoded
        start = time.perf_counter()
        for _ in range(batches):
            loader.next_batch()
        seconds = time.perf_counter() - start
    return {"images_per_s": batches * args["batch_size"] / seconds, "workers": args["workers"],
            "source_size": args["source_size"], "image_size": config.vision_config.image_size}


BFLOAT16_PROBE_SIZE = 256
BFLOAT16_SECONDS = 10  # the longest the full-size bfloat16 measurement (a warm-up and five) may take


def matmul_peak(args: dict) -> dict:
    """The machine's matmul peak in this run: MLX (through the loaded BLAS), torch and numpy, float32,
    and torch's bfloat16; the best float32 figure is the MFU denominator."""
    n = args["matmul_size"]
    rng = np.random.default_rng(SEED)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    times, _ = timed(lambda: a @ b, 5, 1)
    torch_engine = engine_class("torch")
    torch_float32 = torch_engine.matmul_gflops(n)
    # A CPU without bfloat16 instructions (no AVX512-BF16 or AMX) runs torch's bfloat16 matmuls
    # slowly (12-19 GFLOP/s on a 2-core AMD EPYC with AVX2 at n=512, and `a @ b` took over five
    # minutes for six products at n=2048 there). A small probe first; the full size unless the probe
    # says it would take longer than BFLOAT16_SECONDS (then the figure is the probe's, and says so).
    bfloat16_size = min(n, BFLOAT16_PROBE_SIZE)
    torch_bfloat16 = torch_engine.matmul_gflops(bfloat16_size, repeats=3, dtype="bfloat16")
    if bfloat16_size < n and 6 * 2 * n ** 3 / (torch_bfloat16 * 1e9) <= BFLOAT16_SECONDS:
        bfloat16_size, torch_bfloat16 = n, torch_engine.matmul_gflops(n, dtype="bfloat16")
    return {"size": n, "mlx_float32": engine_class("mlx").matmul_gflops(n), "torch_float32": torch_float32,
            "torch_bfloat16": torch_bfloat16, "torch_bfloat16_size": bfloat16_size,
            "numpy_float32": 2 * n ** 3 / statistics.median(times) / 1e9}


def on_device(args: dict) -> dict:
    """Task `args["task"]` with where it ran and its peak accelerator memory added, for a task that
    does not report them itself (`inference`): `worker on_device '{"task": "inference", ...}'`."""
    result = TASKS[args["task"]](args)
    result.setdefault("accelerator", device_report(args.get("engine", "torch")))
    return result


TASKS = {"train": train, "inference": inference, "open_clip": open_clip_peer, "transformers": transformers_peer,
         "data": data_pipeline, "peak": matmul_peak, "on_device": on_device}


def main(argv: list[str] | None = None) -> None:
    task, raw = (argv or sys.argv[1:])[:2]
    print(json.dumps(TASKS[task](json.loads(raw))))


if __name__ == "__main__":
    main()
