"""Embedding a dataset for evaluation: each distinct image once, decoded on threads a batch at a
time so only the (N, P) embeddings are kept; unreadable images skipped, counted and named; and the
prompt-ensembled zero-shot classifier of a list of classes."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from mlx_clip.api import CLIP, IMAGE_BATCH, TEXT_BATCH
from mlx_clip.data.decode import open_stored
from mlx_clip.data.sample import Sample
from mlx_clip.data.stream import StoredImage
from mlx_clip.data.templates import check_templates, fill
from mlx_clip.errors import ConfigError, DataError, ImageError
from mlx_clip.evaluation.metrics import build_class_embeds
from mlx_clip.model.image_processing import DEFAULT_MAX_PIXELS

log = logging.getLogger(__name__)

_SHOWN_ERRORS = 5  # unreadable images listed by name in a result; the count is always complete


@dataclass
class EncodedDataset:
    """Embeddings of a sample list: one image row per distinct readable image."""

    image_embeds: np.ndarray  # (N, P) float32, rows in order of each image's first sample
    image_ids: np.ndarray  # (N,) Sample.image_id of each row
    labels: np.ndarray | None  # (N,) class index per row; None when the samples carry no labels
    text_embeds: np.ndarray | None  # (M, P) one row per caption of a readable image (texts=True)
    text_to_image: np.ndarray | None  # (M,) the image row each caption belongs to
    unreadable: list[str] = field(default_factory=list)  # one "cannot read image ..." per skipped image

    @property
    def num_images(self) -> int:
        return int(self.image_embeds.shape[0])

    def report_extras(self) -> dict:
        """What every result carries about its inputs, so a skipped image is never silent."""
        extras = {"images": self.num_images, "unreadable_images": len(self.unreadable)}
        if self.unreadable:
            extras["unreadable_examples"] = self.unreadable[:_SHOWN_ERRORS]
        return extras


def _image_rows(samples: Sequence[Sample]) -> tuple[np.ndarray, np.ndarray]:
    """(first sample index of each distinct image, image row of every sample), first-seen order.

    numpy rather than a dict keyed by id keeps this bookkeeping at a few bytes per sample.
    """
    ids = getattr(samples, "image_ids", None)  # a read dataset holds them as a column
    if ids is None:
        ids = np.fromiter((s.image_id for s in samples), dtype=np.int64, count=len(samples))
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    row_of_unique = np.empty_like(order)
    row_of_unique[order] = np.arange(order.size)
    return first[order], row_of_unique[inverse.reshape(-1)]


def _row_labels(samples: Sequence[Sample], first: np.ndarray, sample_row: np.ndarray) -> np.ndarray | None:
    labels = np.fromiter((-1 if s.label is None else s.label for s in samples), np.int64, len(samples))
    if (labels < 0).all():
        return None
    per_row = labels[first]
    bad = np.nonzero(labels != per_row[sample_row])[0]
    if bad.size:
        s = samples[int(bad[0])]
        raise DataError(f"samples sharing image_id {s.image_id} ({s.image}) have different labels")
    if (per_row < 0).any():
        s = samples[int(first[np.argmax(per_row < 0)])]
        raise DataError(f"{s.image}: sample has no label while others do; label every sample or none")
    return per_row


def encode_dataset(
    clip: CLIP,
    samples: Sequence[Sample],
    *,
    batch_size: int = IMAGE_BATCH,
    texts: bool = True,
    text_batch_size: int = TEXT_BATCH,
    workers: int | None = None,
) -> EncodedDataset:
    """Encode each distinct image once (samples sharing `image_id` share it) and, with `texts`,
    every caption. Images that cannot be decoded are skipped, counted and logged; their captions
    are dropped with them. Decoding runs on `workers` threads (Pillow releases the GIL)."""
    if batch_size < 1 or text_batch_size < 1:
        raise ConfigError(f"batch sizes must be >= 1, got {batch_size} and {text_batch_size}")
    if not samples:
        raise DataError("nothing to evaluate: the sample list is empty")
    first, sample_row = _image_rows(samples)
    labels = _row_labels(samples, first, sample_row)
    n = first.size
    embeds: np.ndarray | None = None
    readable = np.zeros(n, dtype=bool)
    unreadable: list[str] = []

    def decode(index: int) -> np.ndarray | str:
        try:
            image = samples[index].image
            if isinstance(image, StoredImage):  # inside a shard: decoded here so errors name shard and key
                image = open_stored(image, DEFAULT_MAX_PIXELS)
            return clip.preprocess([image])  # (1, H, W, 3)
        except ImageError as err:
            return str(err)

    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, n, batch_size):
            decoded = list(pool.map(decode, first[start:start + batch_size].tolist()))
            ok = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
            unreadable.extend(d for d in decoded if isinstance(d, str))
            if not ok:
                continue
            pixels = np.concatenate([decoded[i] for i in ok])  # (B, H, W, 3)
            del decoded
            out = np.asarray(clip.encode_images(pixels, batch_size=len(ok)), dtype=np.float32)
            if embeds is None:
                embeds = np.empty((n, out.shape[1]), dtype=np.float32)
            rows = start + np.asarray(ok)
            embeds[rows] = out
            readable[rows] = True
    if embeds is None:
        raise DataError(f"none of the {n} images could be read; first error: {unreadable[0]}")
    if unreadable:
        log.warning("%d of %d images could not be read and were skipped, e.g. %s",
                    len(unreadable), n, unreadable[0])
        embeds = embeds[readable]
    kept_ids = np.fromiter((samples[i].image_id for i in first[readable]), np.int64, int(readable.sum()))

    text_embeds = text_to_image = None
    if texts:
        new_row = np.cumsum(readable) - 1  # image row after dropping the unreadable ones
        chosen = np.nonzero(readable[sample_row])[0]
        text_to_image = new_row[sample_row[chosen]]
        text_embeds = np.empty((chosen.size, embeds.shape[1]), dtype=np.float32)
        for start in range(0, chosen.size, text_batch_size):
            part = chosen[start:start + text_batch_size]
            text_embeds[start:start + part.size] = clip.encode_texts(
                [samples[i].caption for i in part.tolist()], batch_size=text_batch_size)
    return EncodedDataset(embeds, kept_ids, None if labels is None else labels[readable],
                          text_embeds, text_to_image, unreadable)


def class_embeddings(clip: CLIP, class_names: Sequence[str], templates: Sequence[str], *,
                     batch_size: int = TEXT_BATCH) -> np.ndarray:
    """(C, P) zero-shot classifier: each class's prompts encoded and ensembled (CLIP, Radford et
    al. 2021, sec. 3.1.4). Classes are encoded a few at a time so C x T prompts never coexist."""
    if not class_names:
        raise DataError("zero-shot classification needs at least one class, got none")
    templates = check_templates(list(templates))
    per_chunk = max(1, batch_size // len(templates))
    parts = []
    for start in range(0, len(class_names), per_chunk):
        names = class_names[start:start + per_chunk]
        prompts = [fill(t, name) for name in names for t in templates]
        emb = clip.encode_texts(prompts, batch_size=batch_size)
        parts.append(build_class_embeds(emb.reshape(len(names), len(templates), -1)))  # (c, T, P)
    return np.concatenate(parts)
