"""Data parallelism over MLX's CPU streams.

MLX's CPU backend runs the elementwise, reduction and copy work of a stream on one thread; only
the BLAS calls use more cores. So the engine cuts a batch into slices, one stream each, with one
BLAS thread per stream: every core then works all the time (measured on ViT-B/32 forward passes
at batch 32 on 2 cores: image 2.15 -> 1.85 s, text 1.98 -> 1.54 s). The towers treat samples
independently, so the slices' features, concatenated, are the batch's; gradients flow back through
the concatenation, and each slice's backward pass runs on its own stream too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import mlx.core as mx

from mlx_clip.engine.blas import blas_threads
from mlx_clip.engine.policy import cpu_streams


class BatchSplit:
    def __init__(self, count: int | None = None):
        count = cpu_streams() if count is None and mx.default_device() == mx.cpu else (count or 1)
        self.streams = [mx.new_stream(mx.cpu) for _ in range(count)] if count > 1 else []

    def __call__(self, fn: Callable[..., mx.array], batch: mx.array, *aligned: mx.array | None) -> mx.array:
        """fn(batch, *aligned), computed slice by slice on the streams (rows 0..B split as evenly as
        they go; arrays in `aligned`, such as patch dropout's indices, are split with the same rows,
        None passed as it is)."""
        parts = min(len(self.streams), batch.shape[0])
        if parts < 2:
            return fn(batch, *aligned)
        bounds = [round(i * batch.shape[0] / parts) for i in range(1, parts)]
        pieces = [mx.split(a, bounds, axis=0) if a is not None else [None] * parts for a in (batch, *aligned)]
        outputs = []
        for stream, args in zip(self.streams, zip(*pieces)):
            with mx.stream(stream):
                outputs.append(fn(*args))
        return mx.concatenate(outputs, axis=0)

    def evaluating(self, rows: int | None = None):
        """The context to evaluate a batch of `rows` in (None: one that splits): one BLAS thread
        per stream while the streams run. A batch too small to split runs on one stream, whose
        matmuls keep every BLAS thread (a lone image: 140 -> 110 ms at ViT-B/32 on 2 cores)."""
        splits = self.streams and (rows is None or rows >= 2)
        return blas_threads(1) if splits else contextlib.nullcontext()
