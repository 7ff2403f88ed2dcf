"""MLX against torch op by op, at the shapes of a ViT-B/32 training step on the CPU.

    python -m mlx_clip.benchmarks.ops [--batch 16] [--repeats 9] [--out benchmarks/results/ops]
    python -m mlx_clip.benchmarks.ops --inference [--batches 1,8,32] [--repeats 3]

Each row times one operation (forward, or forward and backward) three ways where they exist:
MLX's own kernel, the MLX engine's reformulation (`mlx_clip/mlx_backend/cpu_math.py`) and torch.
The rows under "MLX CPU behaviours" are minimal reproductions of what the engine works around, for
reports to MLX itself: each prints the slow case and the fast one side by side.

Batch 16 is the slice one CPU stream sees at batch 32 on 2 cores (`parallel.BatchSplit`), and
both frameworks get one thread, as one stream does. The MLX functions are compiled (`mx.compile`),
as in the engine's train step; median of `--repeats`.
"""

from __future__ import annotations

import mlx_clip  # noqa: F401  (the BLAS loader runs before anything imports mlx)

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import torch

from mlx_clip.engine.base import median_seconds
from mlx_clip.engine.blas import blas_threads
from mlx_clip.mlx_backend import cpu_math


def median_ms(run: Callable[[], object], repeats: int) -> float:
    return 1e3 * median_seconds(run, repeats, warmup=2)


def mlx_runner(fn: Callable, *arrays) -> Callable[[], None]:
    compiled = mx.compile(fn)
    return lambda: mx.eval(compiled(*arrays))


def mlx_grad_runner(fn: Callable, *arrays) -> Callable[[], None]:
    """Forward and backward of sum(fn(x) * cotangent), gradient with respect to the first array."""
    cotangent = mx.random.normal(fn(*arrays).shape)
    compiled = mx.compile(mx.grad(lambda *a: (fn(*a) * cotangent).sum()))
    return lambda: mx.eval(compiled(*arrays))


def torch_grad_runner(fn: Callable, first: torch.Tensor, *rest) -> Callable[[], None]:
    first = first.detach().requires_grad_(True)
    cotangent = torch.randn_like(fn(first, *rest))

    def run():
        first.grad = None
        (fn(first, *rest) * cotangent).sum().backward()

    return run


def op_rows(batch: int, repeats: int) -> list[dict]:
    tokens, width, inner, heads = batch * 50, 768, 3072, 12
    x = mx.random.normal((tokens, width))
    h = mx.random.normal((tokens, inner))
    scores = mx.random.normal((batch, heads, 50, 50))
    weight, bias, ln_w = mx.random.normal((inner, width)) * 0.02, mx.zeros((inner,)), mx.ones((width,))
    mx.eval(x, h, scores, weight, bias, ln_w)
    tx, th, ts = (torch.from_numpy(np.array(a)) for a in (x, h, scores))
    tw, tb = torch.from_numpy(np.array(weight)), torch.zeros(inner)
    tln = torch.nn.LayerNorm(width)
    native_gelu = lambda v: v * mx.sigmoid(1.702 * v)  # noqa: E731
    rows = [
        ("linear 768->3072 fwd", mlx_runner(lambda a: mx.addmm(bias, a, weight.T), x),
         mlx_runner(lambda a: cpu_math.linear(a, weight, bias), x), lambda: torch.nn.functional.linear(tx, tw, tb)),
        ("linear 768->3072 fwd+bwd", mlx_grad_runner(lambda a: mx.addmm(bias, a, weight.T), x),
         mlx_grad_runner(lambda a: cpu_math.linear(a, weight, bias), x),
         torch_grad_runner(lambda a: torch.nn.functional.linear(a, tw, tb), tx)),
        ("quick_gelu fwd", mlx_runner(native_gelu, h), mlx_runner(cpu_math.quick_gelu, h),
         lambda: th * torch.sigmoid(1.702 * th)),
        ("quick_gelu fwd+bwd", mlx_grad_runner(native_gelu, h), mlx_grad_runner(cpu_math.quick_gelu, h),
         torch_grad_runner(lambda a: a * torch.sigmoid(1.702 * a), th)),
        ("softmax fwd", mlx_runner(lambda s: mx.softmax(s, axis=-1, precise=True), scores),
         mlx_runner(cpu_math.softmax, scores), lambda: torch.softmax(ts, -1)),
        ("softmax fwd+bwd", mlx_grad_runner(lambda s: mx.softmax(s, axis=-1, precise=True), scores),
         mlx_grad_runner(cpu_math.softmax, scores), torch_grad_runner(lambda a: torch.softmax(a, -1), ts)),
        ("exp", mlx_runner(mx.exp, h), mlx_runner(cpu_math.exp, h), lambda: torch.exp(th)),
        ("layer_norm fwd", mlx_runner(lambda a: mx.fast.layer_norm(a, ln_w, None, 1e-5), x), None, lambda: tln(tx)),
        ("layer_norm fwd+bwd", mlx_grad_runner(lambda a: mx.fast.layer_norm(a, ln_w, None, 1e-5), x), None,
         torch_grad_runner(tln, tx)),
        ("attention (sdpa) fwd", mlx_runner(lambda s: mx.fast.scaled_dot_product_attention(s, s, s, scale=0.125),
                                            scores), None,
         lambda: torch.nn.functional.scaled_dot_product_attention(ts, ts, ts)),
    ]
    out = []
    for name, native, ours, reference in rows:
        timings = {"mlx": median_ms(native, repeats) if native else None,
                   "mlx_cpu_math": median_ms(ours, repeats) if ours else None,
                   "torch": median_ms(reference, repeats)}
        out.append({"op": name, **timings})
    return out


def behaviour_rows(repeats: int) -> list[dict]:
    """Minimal reproductions of MLX CPU behaviours the engine works around (slow vs fast)."""
    rows = []
    big = mx.random.normal((1600, 3072))
    mx.eval(big)
    # 1. Autodiff leaves nn.Linear's weight gradient transposed (a strided view): every later
    #    elementwise kernel on it (an optimizer update) reads it column by column.
    layer = nn.Linear(768, 3072)
    mx.eval(layer.parameters())
    inputs = mx.random.normal((1600, 768))
    grad = mx.grad(lambda w: mx.addmm(layer.bias, inputs, w.T).sum())(layer.weight)
    contiguous = mx.contiguous(grad)
    moments = mx.zeros(grad.shape)
    mx.eval(grad, contiguous, moments)
    update = mx.compile(lambda v, g: 0.98 * v + 0.02 * g * g)
    rows.append({"behaviour": "optimizer update on nn.Linear's weight gradient (transposed view vs contiguous)",
                 "slow_ms": median_ms(lambda: mx.eval(update(moments, grad)), repeats),
                 "fast_ms": median_ms(lambda: mx.eval(update(moments, contiguous)), repeats)})
    # 2. Subnormal results (exp of a masked score) slow every multiply that reads them.
    tiny = mx.full((32, 12, 50, 50), 1e-39)
    normal = mx.full((32, 12, 50, 50), 1e-30)
    values = mx.random.normal((32, 12, 50, 64))
    mx.eval(tiny, normal, values)
    rows.append({"behaviour": "weights @ values with subnormal vs normal weights",
                 "slow_ms": median_ms(lambda: mx.eval(tiny @ values), repeats),
                 "fast_ms": median_ms(lambda: mx.eval(normal @ values), repeats)})
    # 3. MLX's exp kernel against the same exp from fused multiply-adds.
    rows.append({"behaviour": "mx.exp vs cpu_math.exp (compiled, 1600x3072)",
                 "slow_ms": median_ms(mlx_runner(mx.exp, big), repeats),
                 "fast_ms": median_ms(mlx_runner(cpu_math.exp, big), repeats)})
    # 4. `x ** 2` compiles to a pow() call per element; `square` to a multiply.
    rows.append({"behaviour": "x ** 2 vs mx.square(x) (compiled)",
                 "slow_ms": median_ms(mlx_runner(lambda a: a ** 2, big), repeats),
                 "fast_ms": median_ms(mlx_runner(mx.square, big), repeats)})
    return rows


def markdown(result: dict) -> str:
    def fmt(value):
        return "—" if value is None else f"{value:.2f}"

    lines = [f"# MLX vs torch op by op (batch {result['batch']}, ms, median of {result['repeats']})", "",
             "| op | MLX native | MLX engine (cpu_math) | torch | engine / torch |", "|---|---|---|---|---|"]
    for row in result["ops"]:
        best = row["mlx_cpu_math"] if row["mlx_cpu_math"] is not None else row["mlx"]
        lines.append(f"| {row['op']} | {fmt(row['mlx'])} | {fmt(row['mlx_cpu_math'])} | {fmt(row['torch'])} | "
                     f"{best / row['torch']:.2f} |")
    lines += ["", "| MLX CPU behaviour (minimal reproduction) | slow ms | fast ms | ratio |", "|---|---|---|---|"]
    for row in result["behaviours"]:
        lines.append(f"| {row['behaviour']} | {row['slow_ms']:.2f} | {row['fast_ms']:.2f} | "
                     f"{row['slow_ms'] / row['fast_ms']:.1f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ops"))
    parser.add_argument("--inference", action="store_true",
                        help="Instead: where inference time goes inside each tower's real forward, both "
                             "engines, at --batches (benchmarks/forward_profile.py).")
    parser.add_argument("--batches", default="1,8,32", help="With --inference: the batch sizes.")
    args = parser.parse_args(argv)
    if args.inference:
        inference_profile(args)
        return
    mx.set_cache_limit(mx.get_memory_limit())  # as the engine does on the CPU
    torch.set_num_threads(1)  # one core each: what one MLX stream and one torch thread can use
    with blas_threads(1):
        result = {"batch": args.batch, "repeats": args.repeats, "ops": op_rows(args.batch, args.repeats),
                  "behaviours": behaviour_rows(args.repeats), "threads": 1}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ops.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (args.out / "ops.md").write_text(text)
    print(text)


def inference_profile(args) -> None:
    """The engines as they run (their own streams and threads), not one op on one core."""
    from mlx_clip.api import resolve
    from mlx_clip.benchmarks import forward_profile

    rows = forward_profile.run(resolve("vit-b32"), forward_profile.parse_batches(args.batches), args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "inference.json").write_text(json.dumps(rows, indent=2) + "\n")
    text = forward_profile.markdown(rows)
    (args.out / "inference.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
