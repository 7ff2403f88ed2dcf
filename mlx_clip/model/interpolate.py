"""Bicubic resizing of a position-embedding grid, equal to
`torch.nn.functional.interpolate(mode="bicubic", align_corners=False)` (Keys' kernel, A = -0.75),
which transformers uses for `interpolate_pos_encoding`. Written as two constant matrices so the
resize is a pair of matmuls: differentiable and cheap in any engine, and numpy-only here.
"""

from __future__ import annotations

import numpy as np

_A = -0.75  # torch's cubic convolution coefficient


def _cubic(t: np.ndarray) -> np.ndarray:
    t = np.abs(t)
    near = ((_A + 2) * t - (_A + 3)) * t * t + 1
    far = ((_A * t - 5 * _A) * t + 8 * _A) * t - 4 * _A
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) matrix M with M @ x the bicubic resize of x along its first axis."""
    scale = in_size / out_size
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        src = scale * (i + 0.5) - 0.5  # no clamp for cubic, as torch's area_pixel_compute_source_index
        base = int(np.floor(src))
        frac = src - base
        for tap in range(-1, 3):
            index = min(max(base + tap, 0), in_size - 1)  # border taps repeat the edge
            matrix[i, index] += _cubic(np.array(frac - tap))
    return matrix.astype(np.float32)

