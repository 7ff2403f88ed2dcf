"""One measurement in a fresh interpreter, printed as one JSON line on stdout.

    python -m mlx_clip.benchmarks.worker TASK '{"size": "tiny", ...}'

Each row of `mlxclip bench` runs here on its own, so that one engine's threads, allocator caches and
peak memory never colour another's figures. Engines are reached through `mlx_clip.engine.protocol`; the peer
rows (open_clip's and transformers' own training steps) build what those users would run instead.
"""

from __future__ import annotations

import mlx_clip  # noqa: F401  (the BLAS loader runs before anything imports mlx)

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


def timed(run: Callable[[], object], steps: int, warmup: int) -> tuple[list[float], list]:
    outputs = [run() for _ in range(warmup)]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        outputs.append(run())
        times.append(time.perf_counter() - start)
    return times, outputs


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train(args: dict) -> dict:
    folder = resolve(SIZES[args["size"]])
    engine = load_backend(args["engine"], folder)
    cfg = TrainConfig(model=str(folder), backend=args["engine"], precision=args.get("precision", "fp32"),
                      lr=args.get("lr", 1e-5), warmup_steps=0)
    engine.prepare_training(cfg)
    batch = synthetic_batch(engine.config, args["batch_size"])
    times, metrics = timed(lambda: engine.train_step(batch, cfg.lr), args["steps"], args["warmup"])
    return {"seconds": times, "loss": metrics[-1]["loss"], "first_loss": metrics[0]["loss"],
            "memory": {**engine.memory(), "peak_rss_bytes": peak_rss()},
            "flops_per_image": train_flops_per_pair(engine.config, TEXT_LENGTH)}


def inference(args: dict) -> dict:
    engine = load_backend(args["engine"], resolve(SIZES[args["size"]]))
    batch = synthetic_batch(engine.config, args["batch_size"])
    images, _ = timed(lambda: engine.encode_images(batch.pixels), args["steps"], args["warmup"])
    texts, _ = timed(lambda: engine.encode_texts(batch.input_ids), args["steps"], args["warmup"])
    return {"image_seconds": images, "text_seconds": texts, "memory": {"peak_rss_bytes": peak_rss()}}


def _torch_peer_step(model, loss_of, lr: float):
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
        return float(loss.detach())

    return step


def open_clip_peer(args: dict) -> dict:
    """open_clip's own step, as its CPU default runs it: `create_model`, `ClipLoss`, AdamW, float32."""
    import open_clip
    import torch

    from mlx_clip.conversion import convert

    folder = resolve(SIZES[args["size"]])
    with tempfile.TemporaryDirectory() as scratch:
        out = convert(folder, Path(scratch) / "open_clip", to="open_clip", verify=False)
        model = open_clip.create_model(f"local-dir:{out}")
    config = load_backend("torch", folder).config
    batch = synthetic_batch(config, args["batch_size"])
    pixels = torch.from_numpy(batch.pixels).permute(0, 3, 1, 2).contiguous()
    ids = torch.from_numpy(batch.input_ids)
    criterion = open_clip.ClipLoss()

    def loss_of():
        image, text, scale = model(pixels, ids)[:3]
        return criterion(image, text, scale)

    times, losses = timed(_torch_peer_step(model, loss_of, args.get("lr", 1e-5)), args["steps"], args["warmup"])
    return {"seconds": times, "loss": losses[-1], "first_loss": losses[0], "memory": {"peak_rss_bytes": peak_rss()},
            "flops_per_image": train_flops_per_pair(config, TEXT_LENGTH)}


def transformers_peer(args: dict) -> dict:
    """A plain `transformers.CLIPModel` step (`return_loss=True`) with AdamW, float32."""
    import torch
    import transformers

    folder = resolve(SIZES[args["size"]])
    model = transformers.CLIPModel.from_pretrained(folder, attn_implementation="sdpa")
    config = load_backend("torch", folder).config
    batch = synthetic_batch(config, args["batch_size"])
    pixels = torch.from_numpy(batch.pixels).permute(0, 3, 1, 2).contiguous()
    ids = torch.from_numpy(batch.input_ids)
    times, losses = timed(_torch_peer_step(model, lambda: model(input_ids=ids, pixel_values=pixels,
                                                                 return_loss=True).loss, args.get("lr", 1e-5)),
                          args["steps"], args["warmup"])
    return {"seconds": times, "loss": losses[-1], "first_loss": losses[0], "memory": {"peak_rss_bytes": peak_rss()},
            "flops_per_image": train_flops_per_pair(config, TEXT_LENGTH)}


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


def matmul_peak(args: dict) -> dict:
    """The machine's matmul peak in this run: MLX (through the loaded BLAS), torch and numpy, float32,
    and torch's bfloat16; the best float32 figure is the MFU denominator."""
    n = args["matmul_size"]
    rng = np.random.default_rng(SEED)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    times, _ = timed(lambda: a @ b, 5, 1)
    return {"size": n, "mlx_float32": engine_class("mlx").matmul_gflops(n),
            "torch_float32": engine_class("torch").matmul_gflops(n),
            "torch_bfloat16": engine_class("torch").matmul_gflops(n, dtype="bfloat16"),
            "numpy_float32": 2 * n ** 3 / statistics.median(times) / 1e9}


TASKS = {"train": train, "inference": inference, "open_clip": open_clip_peer, "transformers": transformers_peer,
         "data": data_pipeline, "peak": matmul_peak}


def main(argv: list[str] | None = None) -> None:
    task, raw = (argv or sys.argv[1:])[:2]
    print(json.dumps(TASKS[task](json.loads(raw))))


if __name__ == "__main__":
    main()
