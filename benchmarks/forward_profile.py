"""Where inference time goes inside the real forward pass, MLX engine beside the torch engine.

    python -m mlx_clip.benchmarks.ops --inference [--batches 1,8,32] [--repeats 3]

Each tower is timed whole through the engine (`Backend.encode_images` / `encode_texts`, with the
engine's own streams and threads), at each batch size. MLX's CPU backend has no profiler, so its
parts are measured by ablation: the forward is compiled again with one part replaced by nothing
(the layer norms, the MLP's activation, the attention softmax, the whole attention core, the MLP)
and the part's cost is the difference. torch's parts come from `torch.profiler`'s self CPU time per
operator, grouped the same way. The two methods differ (ablation also removes the memory traffic a
part causes), so compare the totals engine to engine and the parts within an engine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

TOWERS = ("image", "text")
# torch operators, by the part of the layer they belong to (self CPU time is summed per part).
TORCH_PARTS = {
    "matmuls": ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear", "aten::convolution",
                "aten::_convolution", "aten::mkldnn_convolution"),
    "layer norms": ("aten::native_layer_norm", "aten::layer_norm"),
    "attention core": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention",
                       "aten::_softmax", "aten::softmax"),
    "activation": ("aten::sigmoid", "aten::gelu"),
}


def _median_ms(run: Callable[[], object], repeats: int) -> float:
    from mlx_clip.engine.base import median_seconds

    return 1e3 * median_seconds(run, repeats)


def _inputs(config, batch: int):
    from mlx_clip.data.synthetic import synthetic_batch

    data = synthetic_batch(config, batch)
    return {"image": data.pixels, "text": data.input_ids}


@contextlib.contextmanager
def _ablated(part: str):
    """The MLX model's classes with `part` replaced by nothing, for as long as the block runs."""
    import mlx.nn as nn

    from mlx_clip.mlx_backend import model

    patches = {
        "layer norms": [(nn.LayerNorm, "__call__", lambda self, x: x)],
        "activation": [(model.CLIPMLP, "__call__", lambda self, x: self.fc2(self.fc1(x)))],
        "attention softmax": [(model.cpu_math, "softmax", lambda scores, mask=None: scores)],
        "attention core": [(model.CLIPAttention, "__call__",
                            lambda self, x, mask=None, query_rows=None: self.out_proj(self.v_proj(
                                x if query_rows is None else model.pick_rows(x, query_rows))))],
        "MLP": [(model.CLIPMLP, "__call__", lambda self, x: x)],
    }[part]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, replacement in patches:
        setattr(owner, name, replacement)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


MLX_PARTS = ("layer norms", "activation", "attention softmax", "attention core", "MLP")


def _rows(engine_name: str, folder, batches, repeats: int, parts_of) -> list[dict]:
    """One row per batch and tower: the engine's whole encode call, then `parts_of(engine, tower,
    inputs, total)`'s breakdown of it (a dict merged into the row)."""
    from mlx_clip.engine.protocol import load_backend

    engine = load_backend(engine_name, folder)
    rows = []
    for batch in batches:
        inputs = _inputs(engine.config, batch)
        for tower in TOWERS:
            encode = getattr(engine, f"encode_{tower}s")
            total = _median_ms(lambda: encode(inputs[tower]), repeats)
            rows.append({"engine": engine_name, "tower": tower, "batch": batch, "total_ms": total,
                         **parts_of(engine, tower, inputs[tower], total)})
    return rows


def mlx_rows(folder, batches, repeats: int) -> list[dict]:
    from mlx_clip.mlx_backend.backend import MLXBackend

    def ablations(engine, tower: str, inputs, total: float) -> dict:
        parts = {}
        for part in MLX_PARTS:
            with _ablated(part):
                variant = MLXBackend(engine.model)  # compiled anew, tracing the ablated classes
                parts[part] = total - _median_ms(lambda: getattr(variant, f"encode_{tower}s")(inputs), repeats)
        return {"parts_ms": parts}

    return _rows("mlx", folder, batches, repeats, ablations)


def torch_rows(folder, batches, repeats: int) -> list[dict]:
    import torch

    def profiled(engine, tower: str, inputs, total: float) -> dict:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            getattr(engine, f"encode_{tower}s")(inputs)
        self_ms = {event.key: event.self_cpu_time_total / 1e3 for event in profile.key_averages()}
        seen = sum(self_ms.values())
        parts = {part: sum(self_ms.get(name, 0.0) for name in names) for part, names in TORCH_PARTS.items()}
        parts["everything else"] = seen - sum(parts.values())
        return {"parts_ms": parts, "profiled_ms": seen}

    return _rows("torch", folder, batches, repeats, profiled)


def run(folder, batches=(1, 8, 32), repeats: int = 3) -> list[dict]:
    return mlx_rows(folder, batches, repeats) + torch_rows(folder, batches, repeats)


def markdown(rows: list[dict]) -> str:
    lines = ["## Inside the inference forward (ViT-B/32, float32, ms per call, median)", "",
             "| tower | batch | MLX total | torch total | MLX / torch time | MLX parts (by ablation) | "
             "torch parts (profiler, self time) |", "|---|---|---|---|---|---|---|"]
    by_key = {(row["engine"], row["tower"], row["batch"]): row for row in rows}
    for (engine, tower, batch), row in by_key.items():
        if engine != "mlx":
            continue
        peer = by_key.get(("torch", tower, batch))
        ours = ", ".join(f"{name} {value:.1f}" for name, value in row["parts_ms"].items())
        theirs = ", ".join(f"{name} {value:.1f}" for name, value in peer["parts_ms"].items()) if peer else "—"
        ratio = f"{row['total_ms'] / peer['total_ms']:.2f}" if peer else "—"
        lines.append(f"| {tower} | {batch} | {row['total_ms']:.1f} | {peer['total_ms'] if peer else float('nan'):.1f} "
                     f"| {ratio} | {ours} | {theirs} |")
    return "\n".join(lines) + "\n"


def parse_batches(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())

