"""Aspect-ratio buckets: batches of one (height, width) for data of mixed shapes.

Center-cropping every image to a square throws away the sides of a panorama and the top of a
portrait; bucketing (as NovelAI's and SDXL's trainers do for diffusion, and Pix2Struct/NaViT in
spirit for ViTs) instead resizes each image to the patch grid whose aspect ratio is nearest its
own, with no more patches than the square grid has, so a step costs no more time or memory than a
square one. A batch draws from one bucket only, so its pixels stack and the MLX step is compiled
once per bucket shape; the position embeddings are interpolated to the grid as for `--image-size`.

Which bucket a sample belongs to is fixed for the run (from the grid at the size the run starts
at), so a resolution schedule rescales the buckets' shapes without moving samples between them,
and a resumed run finds every bucket's position where it left it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Wider than 2:1 the nearest grid has too few rows (or columns) for a useful crop at CLIP's
# 7x7 ViT-B/32 grid (2 of 7 would be 3.5:1); such images go to the most elongated bucket.
MAX_ASPECT = 2.0


@dataclass(frozen=True)
class Bucket:
    """A patch grid: `rows` x `cols` patches, aspect ratio cols / rows (width / height)."""

    rows: int
    cols: int

    @property
    def aspect(self) -> float:
        return self.cols / self.rows

    def shape(self, image_size: int, patch_size: int, base_grid: int) -> tuple[int, int]:
        """(height, width) in pixels at `image_size`: the grid scaled from the one of `base_grid`
        patches a side, never more patches than the square grid of `image_size`."""
        grid = image_size // patch_size
        if grid == base_grid:
            rows, cols = self.rows, self.cols
        else:
            scale = grid / base_grid
            rows, cols = max(1, round(self.rows * scale)), max(1, round(self.cols * scale))
            while rows * cols > grid * grid:  # rounding up both sides can overshoot the budget
                if rows >= cols:
                    rows -= 1
                else:
                    cols -= 1
        return rows * patch_size, cols * patch_size


def grid_buckets(grid: int, max_aspect: float = MAX_ASPECT) -> list[Bucket]:
    """Every rows x cols grid with the most patches that fit in `grid` x `grid` for its row count,
    aspect within [1/max_aspect, max_aspect]; from tallest to widest."""
    buckets = []
    for rows in range(1, grid * grid + 1):
        cols = grid * grid // rows
        if 1 / max_aspect <= cols / rows <= max_aspect:
            buckets.append(Bucket(rows, cols))
    return sorted(set(buckets), key=lambda b: b.aspect)


def nearest_bucket(width: int, height: int, buckets: list[Bucket]) -> int:
    """The index of the bucket whose aspect ratio is nearest width / height (in log ratio, so
    2:1 and 1:2 are equally far from square)."""
    target = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: (abs(math.log(buckets[i].aspect) - target), i))


def batches_in(samples: int, batch_size: int, drop_last: bool) -> int:
    """Batches `samples` fill: whole ones only with drop_last, else a short last one too."""
    return samples // batch_size if drop_last else -(-samples // batch_size)


def epoch_schedule(sizes: list[int], batch_size: int, drop_last: bool, rng: np.random.Generator) -> np.ndarray:
    """Which bucket each batch of an epoch draws from: bucket b appears once per batch it can fill
    (or per started batch without drop_last), in a seeded random order, so buckets interleave
    instead of the epoch running through one shape after another."""
    counts = [batches_in(n, batch_size, drop_last) for n in sizes]
    schedule = np.repeat(np.arange(len(sizes)), counts)
    return rng.permutation(schedule)
