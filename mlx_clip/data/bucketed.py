"""The aspect-ratio bucket side of the loader (`buckets=True`): which bucket each sample falls in,
each bucket's shape at the current image size, and where a bucketed epoch stands.

A bucketed epoch is the seeded order split by bucket (`data.order.SeededOrder.by_bucket`) and a
seeded schedule of which bucket's batch comes next; its resume point is the schedule entry next
used and each bucket's position in its own order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mlx_clip.data.buckets import grid_buckets, nearest_bucket
from mlx_clip.data.decode import BadFiles
from mlx_clip.data.sample import Sample
from mlx_clip.errors import ConfigError, DataError, ImageError, check_int

Headers = Callable[[list[Path]], "dict[Path, tuple[int, int] | ImageError]"]


class BucketPlan:
    def __init__(self, samples: Sequence[Sample], image_size: int, patch_size: int | None, *, headers: Headers,
                 bad: BadFiles):
        if hasattr(samples, "shard_sizes"):
            raise ConfigError("aspect-ratio buckets need every image's size before the first batch, which data "
                              "read in shards does not give without a pass over it: train these without --buckets")
        check_int("patch_size", patch_size, minimum=1)
        if image_size < patch_size:
            raise ConfigError(f"aspect-ratio buckets need image_size ({image_size}) of at least one patch "
                              f"({patch_size})")
        self.samples, self.headers, self.bad = samples, headers, bad
        self.patch_size = patch_size
        self.base_grid = image_size // patch_size
        self.buckets = grid_buckets(self.base_grid)
        self._bucket_of: np.ndarray | None = None  # sample -> bucket (-1: unreadable), read on first use
        self.batch_index = 0  # entries of the epoch's bucket schedule used
        self.positions = [0] * len(self.buckets)

    def assignment(self) -> np.ndarray:
        """Each sample's bucket, from its image's header (EXIF rotation applied); a file whose
        header cannot be read is recorded as bad, as a failed decode would be, and gets -1."""
        if self._bucket_of is None:
            sizes = self.headers(sorted({s.image for s in self.samples}, key=str))
            bucket_of = np.full(len(self.samples), -1, np.int64)
            for index, sample in enumerate(self.samples):
                size = sizes[sample.image]
                if isinstance(size, ImageError):
                    self.bad.record(index, str(size))
                else:
                    bucket_of[index] = nearest_bucket(*size, self.buckets)
            self._bucket_of = bucket_of
        return self._bucket_of

    def shape(self, bucket: int, image_size: int) -> tuple[int, int]:
        """(height, width) of `bucket` at `image_size`."""
        return self.buckets[bucket].shape(image_size, self.patch_size, self.base_grid)

    def counts(self, image_size: int) -> list[tuple[tuple[int, int], int]]:
        assigned = self.assignment()
        members = np.bincount(assigned[assigned >= 0], minlength=len(self.buckets))
        return [(self.shape(b, image_size), int(members[b])) for b in range(len(self.buckets))]

    def restart(self) -> None:
        self.batch_index, self.positions = 0, [0] * len(self.buckets)

    def state_dict(self) -> dict[str, Any]:
        return {"buckets": grids(self), "batch_index": self.batch_index, "bucket_positions": list(self.positions)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_index = int(state["batch_index"])
        self.positions = [int(p) for p in state["bucket_positions"]]


def grids(plan: BucketPlan | None) -> list[list[int]] | None:
    return None if plan is None else [[b.rows, b.cols] for b in plan.buckets]


def check_same_buckets(saved: list[list[int]] | None, plan: BucketPlan | None) -> None:
    if saved != grids(plan):
        said = "without aspect-ratio buckets" if saved is None else f"with aspect-ratio buckets {saved}"
        mine = "without" if plan is None else f"with buckets {grids(plan)}"
        raise DataError(f"cannot resume the data order: the checkpoint was made {said}, this run is {mine}; "
                        "resume with the same --buckets setting and image size")
