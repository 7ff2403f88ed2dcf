"""The benchmark's Markdown table and PNG chart, from its results JSON."""

from __future__ import annotations

from pathlib import Path


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def machine_line(machine: dict) -> str:
    cpu = machine["cpu"]
    blas = machine["mlx_blas"]
    versions = machine["versions"]
    variables = ", ".join(f"{k}={v}" for k, v in machine["environment"].items()) or "no OpenBLAS/thread variables set"
    return (f"{cpu['model']}, {cpu['cores']} cores ({' '.join(cpu['flags'])}); {machine['os']}; "
            f"mlx {versions.get('mlx')}, torch {versions.get('torch')}, transformers {versions.get('transformers')}, "
            f"open_clip {versions.get('open_clip_torch')}; MLX BLAS {blas['name']}; {variables}; "
            f"git {(machine.get('git_commit') or 'unknown')[:10]}")


def write_markdown(results: dict, path: Path) -> str:
    preset, peak = results["preset"], results["matmul_peak_gflops"]
    torch_fp32 = next((r for r in results["train"] if r["name"] == "torch fp32" and "loss" in r), None)
    lines = [
        f"# mlxclip bench — {results['size']} (batch {preset['batch_size']}, median of {results['steps']} steps "
        f"after {preset['warmup']} warm-up, 77-token texts, full fine-tune, AdamW)",
        "", machine_line(results["machine"]), "",
        f"matmul peak in this run (n={peak.get('size')}): float32 MLX {_fmt(peak.get('mlx_float32'), '.0f')}, "
        f"torch {_fmt(peak.get('torch_float32'), '.0f')}, numpy {_fmt(peak.get('numpy_float32'), '.0f')} GFLOP/s; "
        f"bfloat16 torch {_fmt(peak.get('torch_bfloat16'), '.0f')} GFLOP/s"
        + (f" (n={peak['torch_bfloat16_size']}: the slow path, measured small)"
           if peak.get("torch_bfloat16_size", peak.get("size")) != peak.get("size") else ""),
        "", "| train step | images/s | vs torch fp32 | MFU | loss after steps | loss vs torch fp32 | peak memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["train"]:
        if "error" in row or "skipped" in row:
            reason = f"failed: {row['error']}" if "error" in row else f"skipped: {row['skipped']}"
            lines.append(f"| {row['name']} | {reason} | | | | | |")
            continue
        speed = row["images_per_s"] / torch_fp32["images_per_s"] if torch_fp32 else None
        loss_gap = abs(row["loss"] - torch_fp32["loss"]) / abs(torch_fp32["loss"]) if torch_fp32 else None
        lines.append(f"| {row['name']} | {row['images_per_s']:.2f} | {_fmt(speed, '.2f')}x | {row['mfu']:.1%} | "
                     f"{row['loss']:.4f} | {_fmt(loss_gap, '.1e')} | {row['peak_memory_bytes'] / 2 ** 30:.2f} GiB |")
    paired = results.get("rounds", {})
    if any(len(measured) > 1 for measured in paired.values()):
        lines += ["", "rounds (alternating, images/s): " + "; ".join(
            f"{name} " + ", ".join(f"{row['images_per_s']:.2f}" for row in measured if "images_per_s" in row)
            for name, measured in paired.items()) + " — the rows above show each one's median round"]
    lines += ["", f"| inference (float32 unless n-bit) | images/s, batch {preset['inference_batch']} | texts/s, batch "
                  f"{preset['inference_batch']} | lone image, p50 ms | lone text, p50 ms | weights |",
              "|---|---|---|---|---|---|"]
    for engine, row in results["inference"].items():
        weights = row.get("weight_bytes")
        lines.append(f"| {engine} | {row['images_per_s']:.1f} | {row['texts_per_s']:.1f} | "
                     f"{_fmt(row.get('image_latency_ms'), '.1f')} | {_fmt(row.get('text_latency_ms'), '.1f')} | "
                     f"{_fmt(None if weights is None else weights / 2 ** 20, '.1f')} MiB |")
    data = results["data_pipeline"]
    if "images_per_s" in data:
        lines += ["", f"data pipeline (JPEG {data['source_size']} px -> decode, random resized crop, normalise to "
                      f"{data['image_size']} px, {data['workers']} threads): {data['images_per_s']:.1f} images/s"]
    ratios = results["ratios"]
    lines += ["", "| ratio (side by side, this run) | value |", "|---|---|",
              f"| MLX fp32 / torch fp32 | {_fmt(ratios['mlx_fp32_over_torch_fp32'], '.2f')} |",
              f"| MLX fp32 / torch's best CPU setting | {_fmt(ratios['mlx_fp32_over_torch_best'], '.2f')} |",
              f"| torch's best / open_clip default | {_fmt(ratios['torch_best_over_open_clip'], '.2f')} |",
              f"| MLX matmul / best BLAS on the machine | {_fmt(ratios['mlx_matmul_over_best_blas'], '.2f')} |",
              f"| inference MLX / torch: images/s | {_fmt(ratios.get('mlx_over_torch_images_per_s'), '.2f')} |",
              f"| inference MLX / torch: texts/s | {_fmt(ratios.get('mlx_over_torch_texts_per_s'), '.2f')} |",
              f"| lone image, torch ms / MLX ms | {_fmt(ratios.get('mlx_over_torch_lone_image'), '.2f')} |",
              f"| lone text, torch ms / MLX ms | {_fmt(ratios.get('mlx_over_torch_lone_text'), '.2f')} |"]
    for key, value in ratios.items():  # the quantized rows against MLX float32, as many widths as were run
        if key.startswith("mlx_") and "bit_over_fp32_" in key:
            bits, what = key[len("mlx_"):].split("bit_over_fp32_")
            label = {"images_per_s": "images/s", "texts_per_s": "texts/s", "weight_bytes": "weight memory"}[what]
            lines.append(f"| MLX {bits}-bit / MLX float32: {label} | {_fmt(value, '.2f')} |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def write_png(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in results["train"] if "images_per_s" in r]
    figure = Figure(figsize=(8, 3.6), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 2, 1)
    axes.barh([r["name"] for r in rows], [r["images_per_s"] for r in rows], color="#4C72B0")
    axes.set_xlabel("train step, images/s")
    axes.invert_yaxis()
    axes = figure.add_subplot(1, 2, 2)
    axes.barh([r["name"] for r in rows], [100 * r["mfu"] for r in rows], color="#DD8452")
    axes.set_xlabel("MFU, % of measured matmul peak")
    axes.set_yticklabels([])
    axes.invert_yaxis()
    figure.suptitle(f"mlxclip bench, {results['size']}, batch {results['preset']['batch_size']}")
    figure.tight_layout()
    figure.savefig(path)
