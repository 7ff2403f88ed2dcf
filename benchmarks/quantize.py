"""`python -m mlx_clip.benchmarks.quantize MODEL [--data VAL]`: what `--quantize 8|4` gives in the
MLX engine against the same model in float32.

Per bit width:
- weight memory: bytes of the parameters as MLX holds them (packed integers, scales and biases
  included; what stays float32 counted as float32);
- speed: images/s and texts/s at batch `batch_size` (seeded synthetic inputs, full-context
  texts), float32 and each width measured in turn, `repeats` times after a warm-up, median;
- with `data` (class folders, e.g. the demo's held-out `target/val`): the cosine of each image's
  and each caption's embedding to its float32 embedding (min and mean), and the change in zero-shot
  top-1, by the toolkit's own evaluation (`mlx_clip.evaluation.evaluate.zero_shot`). The captions
  are `captions_<split>.csv` beside the folder when there is one (the demo's layout), else the
  class prompts.

On a CPU the quantized layers dequantize their weights as they run (`mlx_backend/quantize.py`):
expect them slower than float32 there, and faster only where MLX has quantized kernels (a GPU).
"""

from __future__ import annotations

import mlx_clip  # noqa: F401  (the BLAS loader, before mlx)

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from mlx_clip.model.config import QUANTIZE_BITS

BATCH_SIZE = 32
REPEATS = 5


def weight_bytes(clip) -> int:
    """Bytes of the MLX engine's parameters as stored in memory."""
    from mlx.utils import tree_flatten

    return sum(int(array.nbytes) for _, array in tree_flatten(clip.engine.model.parameters()))


def _timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def speeds(models: dict[str, object], batch_size: int, repeats: int) -> dict[str, dict[str, float]]:
    """images/s and texts/s per model, the models taking turns so that drift favours none."""
    from mlx_clip.data.synthetic import synthetic_inputs

    config = next(iter(models.values())).config
    pixels, ids = synthetic_inputs(config, batch_size, seed=0, end="last")
    runs = {name: {"image": lambda c=clip: c.engine.encode_images(pixels),
                   "text": lambda c=clip: c.engine.encode_texts(ids)} for name, clip in models.items()}
    times: dict[str, dict[str, list[float]]] = {name: {"image": [], "text": []} for name in models}
    for name in models:  # compiles each shape once
        for run in runs[name].values():
            run()
    for _ in range(repeats):
        for name in models:
            for kind, run in runs[name].items():
                times[name][kind].append(_timed(run))
    return {name: {f"{kind}s_per_s": batch_size / statistics.median(t) for kind, t in kinds.items()}
            for name, kinds in times.items()}


def held_out(data: Path, captions: Path | None):
    """(class-folder dataset, caption texts) of the held-out data."""
    from mlx_clip.data.records import load_dataset
    from mlx_clip.data.templates import DEFAULT_TEMPLATES, fill

    dataset = load_dataset(data)
    captions = captions or data.parent / f"captions_{data.name}.csv"
    if captions.is_file():
        texts = [sample.caption for sample in load_dataset(captions).samples]
    else:
        texts = [fill(t, name) for name in dataset.class_names for t in dataset.templates or DEFAULT_TEMPLATES]
    return dataset, texts


def _cosines(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    cos = np.sum(a.astype(np.float64) * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return {"min": float(cos.min()), "mean": float(cos.mean())}


def agreement(models: dict[str, object], data: Path, captions: Path | None, batch_size: int) -> dict[str, dict]:
    """Per model: zero-shot top-1 on `data`; per quantized model also its embeddings' cosines to float32's."""
    from mlx_clip.evaluation.encode import encode_dataset
    from mlx_clip.evaluation.evaluate import eval_samples, zero_shot

    dataset, texts = held_out(Path(data), captions)
    out: dict[str, dict] = {}
    reference = None
    for name, clip in models.items():
        images = encode_dataset(clip, eval_samples(dataset), batch_size=batch_size, texts=False).image_embeds
        captions_embeds = clip.encode_texts(texts)
        row = {"zero_shot_top1": float(zero_shot(clip, dataset, batch_size=batch_size)["acc1"]),
               "images": int(images.shape[0]), "captions": len(texts)}
        if reference is None:
            reference = (images, captions_embeds, row["zero_shot_top1"])
        else:
            row.update(image_cosine=_cosines(images, reference[0]),
                       caption_cosine=_cosines(captions_embeds, reference[1]),
                       top1_change=row["zero_shot_top1"] - reference[2])
        out[name] = row
    return out


def measure(model_folder: str | Path, data: str | Path | None = None, bits=QUANTIZE_BITS, *,
            captions: str | Path | None = None, batch_size: int = BATCH_SIZE, repeats: int = REPEATS) -> dict:
    """float32 and each of `bits` side by side (see the module docstring); keys "float32" and
    str(bits), each {weight_bytes, images_per_s, texts_per_s[, zero_shot_top1, image_cosine,
    caption_cosine, top1_change]}, plus the model, the device and the settings."""
    import mlx.core as mx

    from mlx_clip.api import load

    models = {"float32": load(model_folder, "mlx")}
    models.update({str(b): load(model_folder, "mlx", quantize=b) for b in bits})
    results: dict = {name: {"weight_bytes": weight_bytes(clip)} for name, clip in models.items()}
    for name, row in speeds(models, batch_size, repeats).items():
        results[name].update(row)
    if data is not None:
        for name, row in agreement(models, Path(data), Path(captions) if captions else None, batch_size).items():
            results[name].update(row)
    results["settings"] = {"model": str(model_folder), "data": None if data is None else str(data),
                           "device": str(mx.default_device()), "batch_size": batch_size, "repeats": repeats,
                           "quantization": {str(b): models[str(b)].config.quantization for b in bits}}
    return results


def markdown(results: dict) -> str:
    settings = results["settings"]
    float_row = results["float32"]
    lines = [f"model `{settings['model']}` on {settings['device']}, batch {settings['batch_size']}, median of "
             f"{settings['repeats']}" + (f"; held-out data `{settings['data']}`" if settings["data"] else ""), "",
             "| weights | memory | vs float32 | images/s | texts/s | image cosine min / mean | caption cosine min / mean "
             "| zero-shot top-1 (change) |", "|---|---|---|---|---|---|---|---|"]
    for name, row in results.items():
        if name == "settings":
            continue
        cos = {k: f"{row[k]['min']:.5f} / {row[k]['mean']:.5f}" if k in row else "—"
               for k in ("image_cosine", "caption_cosine")}
        top1 = "—" if "zero_shot_top1" not in row else f"{row['zero_shot_top1']:.4f}" + (
            f" ({row['top1_change']:+.4f})" if "top1_change" in row else "")
        label = name if name == "float32" else f"{name}-bit"
        lines.append(f"| {label} | {row['weight_bytes'] / 2 ** 20:.1f} MiB | "
                     f"{row['weight_bytes'] / float_row['weight_bytes']:.2f}x | {row['images_per_s']:.1f} | "
                     f"{row['texts_per_s']:.1f} | {cos['image_cosine']} | {cos['caption_cosine']} | {top1} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mlx_clip.benchmarks.quantize",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="Model folder or built-in name (tiny, small, vit-b32).")
    parser.add_argument("--data", default=None, help="Held-out class folders (e.g. the demo's target/val).")
    parser.add_argument("--captions", default=None,
                        help="Captions file of those images [default: captions_<split>.csv beside --data, else "
                             "the class prompts].")
    parser.add_argument("--bits", default=",".join(map(str, QUANTIZE_BITS)), help="Comma list of widths.")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    args = parser.parse_args(argv)
    from mlx_clip.api import resolve

    results = measure(resolve(args.model), args.data, tuple(int(b) for b in args.bits.split(",")),
                      captions=args.captions, batch_size=args.batch_size, repeats=args.repeats)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
