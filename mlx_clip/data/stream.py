"""Datasets read where they lie, one shard at a time: webdataset tar shards and parquet row groups.

A `ShardedTable` is a `Sequence[Sample]` over shards whose sample counts are known up front (a
manifest, parquet metadata, or one scan of the tar headers), so a sample has a global index and the
loader's seeded order stays a pure function of (seed, epoch, position): each epoch visits the shards
in a seeded order and the samples of a shard in a seeded order of their own (`data.order`). A shard
is opened when its first sample is wanted and only the few in use are kept, so memory does not grow
with the dataset.

A sample that cannot be used (an undecodable image, a missing caption, a member cut off by a
truncated tar, a corrupt row group) still has its place: its image reads as an `ImageError` naming
the shard and key, and the loader counts and skips it as it does a bad file.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlx_clip.data.sample import Sample
from mlx_clip.errors import ConfigError, ImageError

# Shards kept open (their index: keys, captions, where each image lies). The loader works through
# one shard at a time; a batch that spans two, and a decode started ahead, need a second.
OPEN_SHARDS = 3


@dataclass(frozen=True)
class StoredImage:
    """An image inside a shard: `where` names it (shard and key), `read` fetches its bytes."""

    where: str
    read: Callable[[], bytes] = field(compare=False, hash=False, repr=False)

    def __str__(self) -> str:
        return self.where


@dataclass
class ShardIndex:
    """What one opened shard holds, in its own order. `problems[i]` is why sample i is unusable."""

    keys: list[str]
    captions: list  # str, or a function reading (caption, label, problem, negatives) when the sample is read
    images: list[Callable[[], bytes] | None]
    labels: list[int | None]
    problems: dict[int, str] = field(default_factory=dict)
    negatives: list[tuple[str, ...]] | None = None  # hard-negative captions per sample, when read


@dataclass(frozen=True)
class Shard:
    path: Path
    count: int  # samples, as the manifest or the scan counted them: fixes the order
    name: str  # as messages and the fingerprint show it (relative to the data's root)


class ShardedTable(Sequence):
    """Samples of many shards, read on demand. Subclasses open one shard (`open_shard`)."""

    # Hard-negative captions are not counted ahead (that would read every shard before the first
    # step): with them, a batch gets as many slots as its row with the most (`collate`).
    reads_negatives = False

    def __init__(self, shards: Sequence[Shard], *, class_names: list[str] | None = None):
        self.shards = list(shards)
        self.class_names = class_names
        self.shard_sizes = np.array([s.count for s in self.shards], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.shard_sizes)])
        self._open: OrderedDict[int, ShardIndex] = OrderedDict()
        self._lock = threading.Lock()
        self._opening: dict[int, threading.Lock] = {}

    # ---- what a subclass provides --------------------------------------------------------

    def open_shard(self, shard: Shard) -> ShardIndex:
        raise NotImplementedError

    def with_shards(self, shards: list[Shard]) -> ShardedTable:
        return type(self)(shards, class_names=self.class_names)

    # ---- Sequence[Sample] ----------------------------------------------------------------

    @property
    def has_labels(self) -> bool:
        return self.class_names is not None

    @property
    def image_ids(self) -> np.ndarray:
        return np.arange(len(self), dtype=np.int64)  # each stored sample is its own image

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        number = int(np.searchsorted(self.offsets, index, side="right")) - 1
        local = index - int(self.offsets[number])
        shard, held = self.shards[number], self.index_of(number)
        if local >= len(held.keys):  # the shard holds fewer samples than were counted
            where = f"{shard.name}: sample {local + 1} of {shard.count}"
            return Sample(StoredImage(where, _fails(f"{where}: missing (the shard ends after {len(held.keys)})")),
                          "", 0 if self.has_labels else None, index)
        where = f"{shard.name}:{held.keys[local]}"
        problem, reader = held.problems.get(local), held.images[local]
        caption, label = held.captions[local], held.labels[local]
        negatives = held.negatives[local] if held.negatives is not None else ()
        if callable(caption):  # read with the sample (tar shards): its problem is the sample's
            caption, label, text_problem, negatives = caption()
            problem = problem or text_problem
        if problem is not None or reader is None:
            reader = _fails(f"{where}: {problem or 'no image'}")
        label = label if self.has_labels else None
        return Sample(StoredImage(where, reader), caption, 0 if self.has_labels and label is None else label, index,
                      negatives)

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))

    def index_of(self, number: int) -> ShardIndex:
        """Shard `number`'s index, opened on first use and kept while it is among the last used.
        One thread opens a shard while the others wanting it wait (each would index it again);
        other shards stay readable meanwhile."""
        with self._lock:
            opening = self._opening.setdefault(number, threading.Lock())
        with opening:
            with self._lock:
                held = self._open.get(number)
                if held is not None:
                    self._open.move_to_end(number)
                    return held
            held = self.open_shard(self.shards[number])
            with self._lock:
                self._open[number] = held
                while len(self._open) > OPEN_SHARDS:
                    self._open.popitem(last=False)
                self._opening.pop(number, None)
            return held

    # ---- held-out split and resume fingerprint --------------------------------------------

    def split_shards(self, val_fraction: float, seed: int) -> tuple[ShardedTable, ShardedTable]:
        """(train, held-out) by whole shards: a seeded choice of round(fraction x shards), at least
        one when there are two shards or more, never all."""
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
        n = len(self.shards)
        n_val = 0 if val_fraction == 0 or n < 2 else min(max(round(n * val_fraction), 1), n - 1)
        held = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
        return (self.with_shards([s for i, s in enumerate(self.shards) if i not in held]),
                self.with_shards([s for i, s in enumerate(self.shards) if i in held]))

    def fingerprint(self, val: Sequence[Sample]) -> dict[str, object]:
        """Which shards, how many samples each, in which order: reading every caption to hash it
        would cost a pass over the data before the first step."""
        held = val.shards if isinstance(val, ShardedTable) else []
        return {"train_samples": len(self), "train_images": _digest(self.shards),
                "val_samples": len(val), "val": _digest(held)}


def _digest(shards: Sequence[Shard]) -> str:
    h = hashlib.sha256()
    for shard in shards:
        h.update(f"{shard.name}\0{shard.count}\0".encode())
    return h.hexdigest()[:16]


def _fails(reason: str) -> Callable[[], bytes]:
    def read() -> bytes:
        raise ImageError(reason)
    return read
