"""What the loader makes of decoded samples: each image transformed (the seeded augmentation, or
the model's own preprocessing) and a batch collated with its token ids, labels and positive ids."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from mlx_clip.data.duplicates import positive_groups
from mlx_clip.data.sample import Sample
from mlx_clip.errors import ConfigError
from mlx_clip.model.image_processing import normalize, preprocess, random_resized_crop, random_resized_crop_params

Tokenize = Callable[[list[str]], np.ndarray]


@dataclass
class Batch:
    pixels: np.ndarray  # (B, H, W, 3) float32, normalized; NaFlex: (B, L, p*p*3 + 3) packed patches
    input_ids: np.ndarray  # (B, 77) int64
    labels: np.ndarray | None  # (B,) int64 for class-folder data, else None
    image_ids: np.ndarray  # (B,) int64: captions of one image share an id
    indices: np.ndarray  # (B,) int64 positions in the sample list
    multi_positive: bool = True
    # Captions data: ids equal where pairs share their image or their caption (`duplicates.positive_groups`).
    caption_groups: np.ndarray | None = None
    # --negative-column: (B, K, L) token ids of each row's hard-negative captions in K slots (the
    # dataset's most per row, so every batch has one shape), and (B, K) which slots hold one.
    negative_ids: np.ndarray | None = None
    negative_mask: np.ndarray | None = None
    # --patch-dropout: (B, kept) sorted patch indices each image keeps this step (the trainer's draw).
    patch_keep: np.ndarray | None = None
    # The rows of the global batch `pixels` holds when each process decoded only its own share
    # (`BatchLoader(share=...)`); None: all of them.
    pixel_rows: slice | None = None

    def pixels_of(self, rows: slice) -> np.ndarray:
        """The pixels of `rows` of the global batch."""
        if self.pixel_rows is None:
            return self.pixels[rows]
        if rows != self.pixel_rows:
            raise ValueError(f"this process decoded rows {self.pixel_rows} of the batch, not {rows}")
        return self.pixels

    @property
    def positive_ids(self) -> np.ndarray:
        """(B,) ids whose equality marks positive pairs for the loss: the class for class-folder
        data (FLYP-style), else the image and the caption (several captions of one image, and
        different images captioned alike, are positives of each other). Without `multi_positive`,
        only each pair itself (CLIP's one-hot targets)."""
        if not self.multi_positive:
            return np.arange(len(self.indices), dtype=np.int64)
        if self.labels is not None:
            return self.labels
        return self.caption_groups if self.caption_groups is not None else self.image_ids


@dataclass(frozen=True)
class Transform:
    """Pixels of one sample: the model folder's preprocessor stats (`mean`, `std`), a center crop
    (CLIP) or square resize (SigLIP) when not augmenting, else a random resized crop drawn from
    `default_rng([seed, epoch, index])`, so a sample's pixels never depend on when it is made."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop: bool
    crop_scale: tuple[float, float]
    seed: int

    def __call__(self, image: Image.Image, size: int | tuple[int, int], *, augment: bool, epoch: int,
                 index: int) -> np.ndarray:
        if not augment:
            return preprocess(image, size, mean=self.mean, std=self.std, crop=self.crop)
        rng = np.random.default_rng([self.seed, epoch, index])
        crop = random_resized_crop(image, size, rng, scale=self.crop_scale)
        return normalize(np.asarray(crop), self.mean, self.std)


@dataclass(frozen=True)
class NaflexTransform:
    """NaFlex SigLIP 2's sample: the image (or, when augmenting, a random crop of it from
    `default_rng([seed, epoch, index])`, torchvision's RandomResizedCrop box left at its own size)
    resized within the patch budget by `processor` (`naflex.NaflexProcessor`), packed. `size` is
    ignored: each image is sized by its aspect ratio and the budget."""

    processor: object
    crop_scale: tuple[float, float]
    seed: int

    def __call__(self, image: Image.Image, size, *, augment: bool, epoch: int, index: int) -> np.ndarray:
        if augment:
            rng = np.random.default_rng([self.seed, epoch, index])
            top, left, height, width = random_resized_crop_params(image.width, image.height, rng, scale=self.crop_scale)
            image = image.crop((left, top, left + width, top + height))
        return self.processor(image)


def collate(samples: Sequence[Sample], indices: list[int], pixels: list[np.ndarray], tokenize: Tokenize, *,
            multi_positive: bool, pixel_rows: slice | None = None) -> Batch:
    """The batch of the samples `indices`, in their order, with the `pixels` of all of them (or of
    `pixel_rows` of them, a process's share)."""
    indices = np.array(indices, dtype=np.int64)
    chosen = [samples[i] for i in indices]
    input_ids = np.asarray(tokenize([s.caption for s in chosen])).astype(np.int64)
    if input_ids.shape[0] != len(chosen):
        raise ConfigError(f"tokenize returned {input_ids.shape[0]} rows for {len(chosen)} captions")
    labels = np.array([s.label for s in chosen], dtype=np.int64) if samples.has_labels else None
    image_ids = np.array([s.image_id for s in chosen], dtype=np.int64)
    groups = positive_groups(image_ids, [s.caption for s in chosen]) if labels is None and multi_positive else None
    negative_ids, negative_mask = _negatives(chosen, _negative_slots(samples, chosen), tokenize)
    return Batch(
        pixels=np.stack(pixels),
        input_ids=input_ids,
        labels=labels,
        image_ids=image_ids,
        caption_groups=groups,
        indices=indices,
        multi_positive=multi_positive,
        pixel_rows=pixel_rows,
        negative_ids=negative_ids,
        negative_mask=negative_mask,
    )


def _negative_slots(samples, chosen: Sequence[Sample]) -> int:
    """Slots per row: the most any row of the dataset has (one shape for the whole run), or, for
    data read shard by shard and not counted ahead, the most in this batch, and at least one."""
    if getattr(samples, "reads_negatives", False):
        return max([1, *(len(s.negatives) for s in chosen)])
    return getattr(samples, "max_negatives", 0)


def _negatives(chosen: Sequence[Sample], slots: int, tokenize: Tokenize) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The batch's hard-negative captions tokenized into `slots` per row. An empty slot holds the
    empty caption: the towers run on a fixed shape, and the loss masks the slot out."""
    if not slots:
        return None, None
    mask = np.zeros((len(chosen), slots), bool)
    texts = []
    for row, sample in enumerate(chosen):
        mask[row, :len(sample.negatives)] = True
        texts.extend(list(sample.negatives) + [""] * (slots - len(sample.negatives)))
    ids = np.asarray(tokenize(texts)).astype(np.int64)
    return ids.reshape(len(chosen), slots, ids.shape[-1]), mask
