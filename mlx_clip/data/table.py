"""Samples held as columns: a dataset of a million rows is a few arrays, not a million objects.

A `SampleTable` is a read-only `Sequence[Sample]`: code that walks a few hundred held-out samples
reads `Sample`s as before, while what runs over a whole training set (the split, the fingerprint,
the loader's order) works on the columns. Image paths stay the strings the data named, relative to
the folder that named them, and become a `Path` only when a sample is read.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlx_clip.data.sample import Sample


# Hard-negative captions of a row: a list, empty where the row has none.
NEGATIVES_TYPE = pa.list_(pa.string())


class SampleTable(Sequence):
    def __init__(self, images: pa.Array | pa.ChunkedArray, captions: pa.Array | pa.ChunkedArray, image_ids: np.ndarray,
                 labels: np.ndarray | None = None, base: str | Path = "",
                 negatives: pa.Array | pa.ChunkedArray | None = None):
        """`images`: paths relative to `base` (or absolute); `image_ids`: rows naming one image share
        an id; `labels`: a class index per row, or None for captions data; `negatives`: a list of
        hard-negative captions per row (`--negative-column`), or None."""
        if not (len(images) == len(captions) == len(image_ids)) or (labels is not None and len(labels) != len(images)) \
                or (negatives is not None and len(negatives) != len(images)):
            raise ValueError("columns of one table must have one length")
        # Chunked as read: joining the chunks would copy the columns for nothing.
        self.images = images if isinstance(images, pa.ChunkedArray) else pa.chunked_array([images], pa.string())
        self.captions = captions if isinstance(captions, pa.ChunkedArray) else pa.chunked_array([captions], pa.string())
        self.image_ids = np.asarray(image_ids, dtype=np.int64)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.base = str(base)
        if negatives is not None and not isinstance(negatives, pa.ChunkedArray):
            negatives = pa.chunked_array([negatives], NEGATIVES_TYPE)
        self.negatives = negatives

    @classmethod
    def from_samples(cls, samples: Sequence[Sample]) -> SampleTable:
        if isinstance(samples, SampleTable):
            return samples
        samples = list(samples)
        labelled = [s.label is not None for s in samples]
        negatives = [list(s.negatives) for s in samples]
        return cls(pa.array([str(s.image) for s in samples], pa.string()),
                   pa.array([s.caption for s in samples], pa.string()),
                   np.array([s.image_id for s in samples], np.int64),
                   np.array([s.label for s in samples], np.int64) if samples and all(labelled) else None,
                   negatives=pa.array(negatives, NEGATIVES_TYPE) if any(negatives) else None)

    # ---- Sequence[Sample] --------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(np.arange(len(self))[index])
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        return Sample(self.path(index), self.captions[index].as_py(),
                      None if self.labels is None else int(self.labels[index]), int(self.image_ids[index]),
                      () if self.negatives is None else tuple(self.negatives[index].as_py()))

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        """Equal to any sequence of the same Samples, in the same order."""
        if not isinstance(other, Sequence) or isinstance(other, str) or len(other) != len(self):
            return NotImplemented if not isinstance(other, Sequence) else False
        return all(a == b for a, b in zip(self, other))

    def __add__(self, other: Sequence[Sample]) -> SampleTable:
        return concat([self, SampleTable.from_samples(other)])

    def __radd__(self, other: Sequence[Sample]) -> SampleTable:
        return concat([SampleTable.from_samples(other), self])

    __hash__ = None  # mutable-looking sequences are unhashable, as a list is

    def __repr__(self) -> str:
        shown = ", ".join(repr(s) for s in self[:3]) + (", ..." if len(self) > 3 else "")
        return f"SampleTable({len(self)} samples: [{shown}])"

    def path(self, index: int) -> Path:
        name = self.images[index].as_py()
        return Path(os.path.normpath(os.path.join(self.base, os.path.expanduser(name)))) if self.base else Path(name)

    # ---- column operations -------------------------------------------------------------

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def take(self, indices: np.ndarray) -> SampleTable:
        indices = np.asarray(indices, dtype=np.int64)
        picked = pa.array(indices)
        return SampleTable(self.images.take(picked), self.captions.take(picked), self.image_ids[indices],
                           None if self.labels is None else self.labels[indices], self.base,
                           None if self.negatives is None else self.negatives.take(picked))

    def with_labels(self, labels: np.ndarray | None) -> SampleTable:
        return SampleTable(self.images, self.captions, self.image_ids, labels, self.base, self.negatives)

    def with_ids_from(self, first_id: int) -> SampleTable:
        return SampleTable(self.images, self.captions, self.image_ids + first_id, self.labels, self.base,
                           self.negatives)

    @functools.cached_property
    def max_negatives(self) -> int:
        """The most hard-negative captions a row has: the batch's fixed number of slots per row."""
        if self.negatives is None or not len(self.negatives):
            return 0
        return int(pc.max(pc.list_value_length(self.negatives)).as_py() or 0)

    def negative_counts(self) -> np.ndarray:
        """(rows,) how many hard-negative captions each row has."""
        if self.negatives is None:
            return np.zeros(len(self), np.int64)
        return np.asarray(pc.list_value_length(self.negatives).fill_null(0)).astype(np.int64)

    def relative_images(self, root: Path) -> pa.ChunkedArray:
        """The image paths relative to `root` where they lie inside it (a moved dataset keeps them),
        else absolute, as one string column."""
        if not self.base:  # built from Samples: absolute paths, few of them
            return pa.chunked_array([[_relative(Path(p), root) for p in self.images.to_pylist()]], pa.string())
        try:
            prefix = Path(self.base).relative_to(root).as_posix()
        except ValueError:
            prefix = Path(self.base).as_posix()
        return self.images if prefix == "." else pc.binary_join_element_wise(prefix, self.images, "/")


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()

def concat(tables: Sequence[SampleTable]) -> SampleTable:
    """One table of several, in order; paths become absolute where the tables' folders differ."""
    bases = {t.base for t in tables}
    if len(bases) == 1:
        images, base = [t.images for t in tables], bases.pop()
    else:
        images = [pc.binary_join_element_wise(t.base, t.images, os.sep) if t.base else t.images for t in tables]
        base = ""
    labelled = [t.labels is not None for t in tables]
    labels = np.concatenate([t.labels for t in tables]) if all(labelled) and tables else None
    negatives = None
    if any(t.negatives is not None for t in tables):
        negatives = pa.chunked_array([chunk for t in tables for chunk in (
            t.negatives.chunks if t.negatives is not None else [pa.array([[]] * len(t), NEGATIVES_TYPE)])],
            NEGATIVES_TYPE)
    return SampleTable(_chunks(images), _chunks([t.captions for t in tables]),
                       np.concatenate([t.image_ids for t in tables]), labels, base, negatives)


def _chunks(columns: Sequence[pa.ChunkedArray]) -> pa.ChunkedArray:
    return pa.chunked_array([chunk for column in columns for chunk in column.chunks], pa.string())
