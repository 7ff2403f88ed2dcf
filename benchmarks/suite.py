"""`mlxclip bench` / `python -m benchmarks`: both engines side by side in one run.

For one model config, batch, resolution and data: train-step images/s of each engine (median of N
timed steps after warm-up) in float32 and, for torch, bfloat16 autocast; the same step as open_clip
and plain transformers users run it; inference images/s, texts/s and lone-request latency (and the
MLX engine's `--quantize` widths, with their weight memory); data-pipeline images/s; peak
memory; MFU against the matmul peak measured in the same run; the loss after the steps. Every row
runs in its own interpreter (`mlx_clip.benchmarks.worker`). Writes `results.json`, `results.md`, `results.png`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlx_clip.environment import report as machine_report
from mlx_clip.errors import ConfigError
from mlx_clip.model.config import QUANTIZE_BITS

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Preset:
    batch_size: int
    steps: int
    warmup: int
    inference_batch: int
    matmul_size: int
    data_images: int
    source_size: int
    rounds: int  # the two float32 engine rows alternate this many times (the machine's speed drifts)
    latency_repeats: int  # lone images / texts timed for the batch-1 latency (p50)


PRESETS = {
    # CI: seconds per row; the figures show the machinery works, not the machine's speed.
    "tiny": Preset(batch_size=16, steps=5, warmup=2, inference_batch=32, matmul_size=512, data_images=64,
                   source_size=128, rounds=1, latency_repeats=5),
    # The real numbers: OpenAI's ViT-B/32 at 224 px, 77-token texts, batch 32.
    "b32": Preset(batch_size=32, steps=3, warmup=2, inference_batch=32, matmul_size=2048, data_images=128,
                  source_size=512, rounds=2, latency_repeats=15),
}
PAIRED_ROWS = [  # measured in alternation, `rounds` times: the headline ratio comes from these
    ("mlx fp32", "train", {"engine": "mlx", "precision": "fp32"}),
    ("torch fp32", "train", {"engine": "torch", "precision": "fp32"}),
]
TRAIN_ROWS = [  # (row name, worker task, arguments beyond the preset's)
    ("torch amp_bf16", "train", {"engine": "torch", "precision": "amp_bf16"}),
    ("open_clip fp32", "open_clip", {}),
    ("transformers fp32", "transformers", {}),
]


def run_worker(task: str, args: dict, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "mlx_clip.benchmarks.worker", task, json.dumps(args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        return {"error": tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def available(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def train_row(name: str, result: dict, batch: int, peaks: dict) -> dict:
    if "error" in result:
        return {"name": name, "error": result["error"]}
    seconds = statistics.median(result["seconds"])
    images_per_s = batch / seconds
    peak = peaks["bfloat16"] if "bf16" in name else peaks["float32"]
    memory = result["memory"]
    return {"name": name, "images_per_s": images_per_s, "step_seconds": seconds, "loss": result["loss"],
            "first_loss": result["first_loss"], "mfu": result["flops_per_image"] * images_per_s / (peak * 1e9),
            "peak_memory_bytes": memory.get("peak_rss_bytes"), "engine_peak_bytes": memory.get("peak_bytes"),
            "peak_rss_bytes": memory.get("peak_rss_bytes"), "flops_per_image": result["flops_per_image"]}


def run(size: str = "tiny", out: str | Path = "benchmarks/results", *, steps: int | None = None,
        echo: Callable[[str], None] = print) -> dict:
    if size not in PRESETS:
        raise ConfigError(f"--size must be one of {', '.join(PRESETS)}, got {size!r}")
    preset = PRESETS[size]
    steps = steps or preset.steps
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timeout = 3600 if size == "b32" else 300

    def phase(label: str, task: str, args: dict) -> dict:
        echo(f"[{time.perf_counter() - started:6.0f}s] {label} ...")
        result = run_worker(task, {"size": size, **args}, timeout)
        if "error" in result:
            echo(f"          {label}: failed ({result['error']})")
        return result

    machine = machine_report()
    peak = phase("matmul peak", "peak", {"matmul_size": preset.matmul_size})
    peaks = {"float32": max(peak.get(k, 0) for k in ("mlx_float32", "torch_float32", "numpy_float32")),
             "bfloat16": peak.get("torch_bfloat16", 0)}
    rows = {}
    rounds: dict[str, list[dict]] = {}
    for index in range(preset.rounds):
        for name, task, extra in PAIRED_ROWS:
            args = {"batch_size": preset.batch_size, "steps": steps, "warmup": preset.warmup, **extra}
            label = f"train step: {name}" + (f" (round {index + 1} of {preset.rounds})" if preset.rounds > 1 else "")
            rounds.setdefault(name, []).append(train_row(name, phase(label, task, args), preset.batch_size, peaks))
    for name, measured in rounds.items():
        rows[name] = _median_row(measured)
    for name, task, extra in TRAIN_ROWS:
        if task in ("open_clip", "transformers") and not available({"open_clip": "open_clip"}.get(task, task)):
            continue
        args = {"batch_size": preset.batch_size, "steps": steps, "warmup": preset.warmup, **extra}
        reason = _too_slow(name, rows.get("torch fp32", {}), peaks, steps + preset.warmup)
        if reason:
            echo(f"          train step: {name}: skipped ({reason})")
            rows[name] = {"name": name, "skipped": reason}
            continue
        rows[name] = train_row(name, phase(f"train step: {name}", task, args), preset.batch_size, peaks)
    inference_rounds: dict[str, list[dict]] = {}
    for index in range(preset.rounds):  # alternating too: the inference ratios are paired as well
        for engine in ("mlx", "torch"):
            label = f"inference: {engine}" + (f" (round {index + 1} of {preset.rounds})" if preset.rounds > 1 else "")
            result = phase(label, "inference", {"engine": engine, "batch_size": preset.inference_batch, "steps": steps,
                                                "warmup": 1, "latency_repeats": preset.latency_repeats})
            if "error" not in result:
                inference_rounds.setdefault(engine, []).append(inference_row(result, preset.inference_batch))
    inference = {engine: _median_row(measured, "images_per_s") for engine, measured in inference_rounds.items()}
    for bits in QUANTIZE_BITS:  # once each, after the paired rows: compared with the MLX float32 row above
        result = phase(f"inference: mlx {bits}-bit", "inference",
                       {"engine": "mlx", "quantize": bits, "batch_size": preset.inference_batch, "steps": steps,
                        "warmup": 1, "latency_repeats": preset.latency_repeats})
        if "error" not in result:
            inference[f"mlx {bits}-bit"] = inference_row(result, preset.inference_batch)
    data = phase("data pipeline", "data", {"images": preset.data_images, "batch_size": preset.batch_size,
                                           "source_size": preset.source_size, "workers": 2})
    results = {
        "size": size, "preset": preset.__dict__, "steps": steps, "machine": machine, "matmul_peak_gflops": peak,
        "train": list(rows.values()), "inference": inference, "data_pipeline": data,
        "rounds": rounds, "inference_rounds": inference_rounds,
        "ratios": {
            **inference_ratios(inference_rounds),
            **quantized_ratios(inference),
            "mlx_fp32_over_torch_fp32": _paired_ratio(rounds, "mlx fp32", "torch fp32"),
            "mlx_fp32_over_torch_best": _over_best_torch(rows),
            "torch_best_over_open_clip": _best_torch_over(rows, "open_clip fp32"),
            "mlx_matmul_over_best_blas": (peak["mlx_float32"] / max(peak["torch_float32"], peak["numpy_float32"])
                                          if "mlx_float32" in peak else None),
        },
        "seconds": time.perf_counter() - started,
    }
    from mlx_clip.benchmarks.bench_report import write_markdown, write_png

    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    markdown = write_markdown(results, out / "results.md")
    write_png(results, out / "results.png")
    echo(markdown)
    echo(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'} in {results['seconds']:.0f} s")
    return results


ROW_SECONDS = 300  # a row expected to take longer than this is skipped, with the estimate as the reason


def _too_slow(name: str, torch_fp32: dict, peaks: dict, steps: int) -> str | None:
    """Why a bfloat16 row is not run: its steps estimated from the torch float32 step and the two
    matmul peaks of this run take more than ROW_SECONDS (a CPU without bfloat16 instructions)."""
    if "bf16" not in name or "step_seconds" not in torch_fp32 or not peaks["bfloat16"]:
        return None
    slower = peaks["float32"] / peaks["bfloat16"]
    estimate = torch_fp32["step_seconds"] * slower * steps
    if estimate <= ROW_SECONDS:
        return None
    return (f"bfloat16 matmuls run {slower:.0f}x slower than float32 on this CPU, so its {steps} steps would take "
            f"~{estimate / 60:.0f} min")


def _median_row(measured: list[dict], key: str = "images_per_s") -> dict:
    """The round with the median speed (its loss, memory and MFU go with it)."""
    good = [row for row in measured if key in row]
    if not good:
        return measured[0]
    return sorted(good, key=lambda row: row[key])[(len(good) - 1) // 2]


def inference_row(result: dict, batch: int) -> dict:
    return {"images_per_s": batch / statistics.median(result["image_seconds"]),
            "texts_per_s": batch / statistics.median(result["text_seconds"]),
            "image_latency_ms": 1e3 * statistics.median(result["image_latency_seconds"]),
            "text_latency_ms": 1e3 * statistics.median(result["text_latency_seconds"]),
            "weight_bytes": result.get("weight_bytes")}


def inference_ratios(rounds: dict[str, list[dict]]) -> dict[str, float | None]:
    """MLX over torch for each inference figure, the median over rounds of back-to-back pairs;
    for latencies torch's over MLX's, so that above 1 means MLX is faster everywhere."""
    pairs = list(zip(rounds.get("mlx", []), rounds.get("torch", [])))

    def ratio(key: str, faster_is_smaller: bool = False) -> float | None:
        values = [(t[key] / m[key]) if faster_is_smaller else (m[key] / t[key]) for m, t in pairs]
        return statistics.median(values) if values else None

    return {"mlx_over_torch_images_per_s": ratio("images_per_s"), "mlx_over_torch_texts_per_s": ratio("texts_per_s"),
            "mlx_over_torch_lone_image": ratio("image_latency_ms", True),
            "mlx_over_torch_lone_text": ratio("text_latency_ms", True)}


def quantized_ratios(inference: dict[str, dict]) -> dict[str, float | None]:
    """Each quantized MLX row over the MLX float32 row: images/s, texts/s and weight memory."""
    base = inference.get("mlx", {})
    out = {}
    for bits in QUANTIZE_BITS:
        row = inference.get(f"mlx {bits}-bit", {})
        for key in ("images_per_s", "texts_per_s", "weight_bytes"):
            known = row.get(key) is not None and base.get(key)
            out[f"mlx_{bits}bit_over_fp32_{key}"] = row[key] / base[key] if known else None
    return out


def _paired_ratio(rounds: dict, a: str, b: str) -> float | None:
    """Median over rounds of a's speed over b's, each pair measured back to back."""
    pairs = [x["images_per_s"] / y["images_per_s"] for x, y in zip(rounds.get(a, []), rounds.get(b, []))
             if "images_per_s" in x and "images_per_s" in y]
    return statistics.median(pairs) if pairs else None


def _best_torch(rows: dict) -> dict | None:
    torch_rows = [r for n, r in rows.items() if n.startswith("torch") and "images_per_s" in r]
    return max(torch_rows, key=lambda r: r["images_per_s"]) if torch_rows else None


def _over_best_torch(rows: dict) -> float | None:
    best = _best_torch(rows)
    mlx = rows.get("mlx fp32", {})
    return mlx["images_per_s"] / best["images_per_s"] if best and "images_per_s" in mlx else None


def _best_torch_over(rows: dict, peer: str) -> float | None:
    best = _best_torch(rows)
    other = rows.get(peer, {})
    return best["images_per_s"] / other["images_per_s"] if best and "images_per_s" in other else None
