"""The unit every dataset reduces to: one image file with one caption (and a class, if any)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Sample:
    image: Path  # absolute path, resolved relative to the file that named it
    caption: str
    label: int | None = None  # class index for class-folder data (multi-positive targets, zero-shot)
    image_id: int = 0  # samples sharing an image (several captions) share an id: retrieval groups them
    negatives: tuple[str, ...] = ()  # --negative-column: captions that are wrong for this image (NegCLIP)
