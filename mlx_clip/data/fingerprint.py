"""What a run trained on, in a few digests: saved with each checkpoint, so `--resume` with other
data (the same number of samples, other captions) is refused, naming what changed, instead of
continuing bit-exactly on something else.

Image paths are taken relative to the data's root, so a dataset moved or mounted elsewhere still
resumes; the order is the samples' own (the loader's seeded order is a function of it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from mlx_clip.data.sample import Sample

# part -> how a changed part is named to the user
PARTS = {"train_samples": "number of training samples", "train_images": "training image paths",
         "train_captions": "training captions", "train_labels": "training class labels",
         "val_samples": "number of held-out samples", "val": "held-out split (paths, captions or labels)"}


def _digest(values: Iterable[object]) -> str:
    h = hashlib.sha256()
    for value in values:
        h.update(repr(value).encode("utf-8"))
        h.update(b"\0")  # a separator no repr contains unescaped: ("ab", "c") != ("a", "bc")
    return h.hexdigest()[:16]


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def fingerprint(train: Sequence[Sample], val: Sequence[Sample], root: str | Path) -> dict[str, object]:
    """Digests of the training samples (paths, captions, labels separately, so a change can be
    named) and of the held-out split."""
    root = Path(root).expanduser().resolve()
    root = root if root.is_dir() else root.parent
    return {
        "train_samples": len(train),
        "train_images": _digest(_relative(s.image, root) for s in train),
        "train_captions": _digest(s.caption for s in train),
        "train_labels": _digest((s.label, s.image_id) for s in train),
        "val_samples": len(val),
        "val": _digest((_relative(s.image, root), s.caption, s.label) for s in val),
    }


def differences(saved: dict, now: dict) -> list[str]:
    """What differs between two fingerprints, in words; [] when they agree."""
    out = []
    for part, words in PARTS.items():
        if part in saved and part in now and saved[part] != now[part]:
            counts = isinstance(saved[part], int)
            out.append(f"{words}: checkpoint {saved[part]}, now {now[part]}" if counts else f"{words} differ")
    return out
