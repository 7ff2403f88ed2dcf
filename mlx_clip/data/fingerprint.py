"""What a run trained on, in a few digests: saved with each checkpoint, so `--resume` with other
data (the same number of samples, other captions) is refused, naming what changed, instead of
continuing bit-exactly on something else.

Image paths are taken relative to the data's root, so a dataset moved or mounted elsewhere still
resumes; the order is the samples' own (the loader's seeded order is a function of it). The digests
read the columns' buffers, so a million rows cost a hash of their bytes, not a loop over objects.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from mlx_clip.data.sample import Sample
from mlx_clip.data.table import SampleTable

# part -> how a changed part is named to the user
PARTS = {"train_samples": "number of training samples", "train_images": "training image paths",
         "train_captions": "training captions", "train_labels": "training class labels",
         "train_negatives": "training hard-negative captions (--negative-column)",
         "val_samples": "number of held-out samples", "val": "held-out split (paths, captions or labels)"}


def _digest(*columns: pa.Array | pa.ChunkedArray | np.ndarray | None) -> str:
    h = hashlib.sha256()
    for column in columns:
        if column is None:
            h.update(b"none")
        elif isinstance(column, np.ndarray):
            h.update(np.ascontiguousarray(column, dtype=np.int64).tobytes())
        else:  # a string column: its lengths, then its bytes, so ("ab", "c") != ("a", "bc"); however chunked
            chunks = [c for c in (column.chunks if isinstance(column, pa.ChunkedArray) else [column]) if len(c)]
            spans = [np.frombuffer(c.buffers()[1], np.int32)[c.offset:c.offset + len(c) + 1] for c in chunks]
            for offsets in spans:
                h.update(np.diff(offsets).astype(np.int64).tobytes())
            for chunk, offsets in zip(chunks, spans):
                h.update(memoryview(chunk.buffers()[2])[offsets[0]:offsets[-1]])
        h.update(b"\0")
    return h.hexdigest()[:16]


def fingerprint(train: Sequence[Sample], val: Sequence[Sample], root: str | Path) -> dict[str, object]:
    """Digests of the training samples (paths, captions, labels separately, so a change can be
    named) and of the held-out split. A streamed dataset (shards, parquet) gives its own."""
    if hasattr(train, "fingerprint"):
        return train.fingerprint(val)
    root = Path(root).expanduser().resolve()
    root = root if root.is_dir() else root.parent
    train, val = SampleTable.from_samples(train), SampleTable.from_samples(val)
    parts = {
        "train_samples": len(train),
        "train_images": _digest(train.relative_images(root)),
        "train_captions": _digest(train.captions),
        "train_labels": _digest(train.labels, train.image_ids),
        "val_samples": len(val),
        "val": _digest(val.relative_images(root), val.captions, val.labels),
    }
    if train.negatives is not None:  # absent without them, so runs from before still resume
        parts["train_negatives"] = _digest(pa.chunked_array([c.flatten() for c in train.negatives.chunks], pa.string()),
                                           train.negative_counts())
    return parts


def differences(saved: dict, now: dict) -> list[str]:
    """What differs between two fingerprints, in words; [] when they agree."""
    out = []
    for part, words in PARTS.items():
        if part in saved and part in now and saved[part] != now[part]:
            counts = isinstance(saved[part], int)
            out.append(f"{words}: checkpoint {saved[part]}, now {now[part]}" if counts else f"{words} differ")
    return out
