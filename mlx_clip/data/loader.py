"""Batches of (pixels, token ids) in a seeded order: a pure function of (seed, epoch, position).

Epoch `e` visits the samples in `np.random.default_rng([seed, e]).permutation(n)`; a batch is the
next `batch_size` samples in that order that decode, so a bad file is replaced by the sample after
it. The augmentation of a sample draws from `default_rng([seed, e, index])`. Nothing depends on
thread timing or on what was loaded before, which is what makes `state_dict()` an exact resume
point: a restored loader yields, bytes included, the batch the original would have yielded next.

With aspect-ratio buckets (`buckets=True`, see `mlx_clip.data.buckets`) the same order is split by
bucket, each batch takes the next samples of one bucket, and which bucket comes next follows a
seeded schedule per epoch; the resume point is then the schedule entry and each bucket's position.

The loader composes the seeded order (`data.order`), decoding on threads with its bad-file ledger
(`data.decode`), the transform (crop, resize, normalise) and the collate into a `Batch`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlx_clip.data.buckets import Bucket, batches_in, grid_buckets, nearest_bucket
from mlx_clip.data.decode import Decoder, result
from mlx_clip.data.order import SeededOrder
from mlx_clip.data.sample import Sample
from mlx_clip.data.table import SampleTable
from mlx_clip.errors import ConfigError, DataError, ImageError, check_int
from mlx_clip.model.image_processing import (
    DEFAULT_MAX_PIXELS,
    OPENAI_MEAN,
    OPENAI_STD,
    normalize,
    preprocess,
    random_resized_crop,
)

Tokenize = Callable[[list[str]], np.ndarray]


@dataclass
class Batch:
    pixels: np.ndarray  # (B, H, W, 3) float32, normalized
    input_ids: np.ndarray  # (B, 77) int64
    labels: np.ndarray | None  # (B,) int64 for class-folder data, else None
    image_ids: np.ndarray  # (B,) int64: captions of one image share an id
    indices: np.ndarray  # (B,) int64 positions in the sample list
    multi_positive: bool = True

    @property
    def positive_ids(self) -> np.ndarray:
        """(B,) ids whose equality marks positive pairs for the loss: the class for class-folder
        data (FLYP-style), else the image (several captions of one image are all positives).
        Without `multi_positive`, only each pair itself (CLIP's one-hot targets)."""
        if not self.multi_positive:
            return np.arange(len(self.indices), dtype=np.int64)
        return self.labels if self.labels is not None else self.image_ids


@dataclass(frozen=True)
class _Pass:
    """One pass over the data: which order, whether to augment and to keep a partial last batch."""

    epoch: int
    order: np.ndarray
    augment: bool
    drop_last: bool
    shape: tuple[int, int] | None = None  # (height, width) of an aspect-ratio bucket; else square


class BatchLoader:
    """Deterministic, resumable batches with threaded decoding; bad images skipped and counted."""

    def __init__(
        self,
        samples: Sequence[Sample],
        *,
        batch_size: int,
        image_size: int,
        tokenize: Tokenize,
        seed: int,
        shuffle: bool = True,
        augment: bool = False,
        drop_last: bool = True,
        num_workers: int = 2,
        max_bad_fraction: float = 0.05,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        crop_scale: tuple[float, float] = (0.9, 1.0),
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
        crop: bool = True,
        decoded_cache_bytes: int = 256 << 20,
        multi_positive: bool = True,
        buckets: bool = False,
        patch_size: int | None = None,
    ) -> None:
        if len(samples) == 0:
            raise DataError("the dataset has no samples")
        check_int("batch_size", batch_size, minimum=1)
        check_int("image_size", image_size, minimum=1)
        check_int("seed", seed, minimum=0)  # SeedSequence entropy must be non-negative
        check_int("num_workers", num_workers, minimum=0)
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ConfigError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        if not hasattr(samples, "has_labels"):  # a list of Samples: held as columns like a read dataset
            labelled = [s.label is not None for s in samples]
            if any(labelled) and not all(labelled):
                raise DataError(
                    f"{labelled.count(False)} of {len(samples)} samples have no label: "
                    "either every sample has a class label or none has"
                )
            samples = SampleTable.from_samples(samples)
        self.samples = samples
        self.batch_size = batch_size
        self.multi_positive = multi_positive
        self.image_size = image_size
        self.tokenize = tokenize
        self.seed = seed
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.max_bad_fraction = max_bad_fraction
        self.max_pixels = max_pixels
        self.crop_scale = crop_scale
        self.mean, self.std = tuple(mean), tuple(std)  # a model folder's preprocessor stats
        self.crop = crop  # center crop (CLIP) or square resize (SigLIP) when not augmenting
        self._has_labels = samples.has_labels
        self.buckets: list[Bucket] | None = None
        if buckets:
            if hasattr(samples, "shard_sizes"):
                raise ConfigError("aspect-ratio buckets need every image's size before the first batch, which data "
                                  "read in shards does not give without a pass over it: train these without --buckets")
            check_int("patch_size", patch_size, minimum=1)
            if image_size < patch_size:
                raise ConfigError(f"aspect-ratio buckets need image_size ({image_size}) of at least one patch "
                                  f"({patch_size})")
            self.patch_size = patch_size
            self._base_grid = image_size // patch_size
            self.buckets = grid_buckets(self._base_grid)
        self._bucket_of: np.ndarray | None = None  # sample -> bucket (-1: unreadable), read on first use
        self.sample_order = SeededOrder(len(self.samples), seed, shuffle=shuffle, batch_size=batch_size,
                                        drop_last=drop_last, buckets=len(self.buckets or ()),
                                        bucket_of=self._assignment, shard_sizes=getattr(samples, "shard_sizes", None))
        self._batch_index = 0  # entries of the epoch's bucket schedule used
        self._bucket_positions = [0] * len(self.buckets or ())
        self._epoch = 0
        self._position = 0  # next place in the current epoch's order
        self.decoder = Decoder(self.samples, self._load, num_workers=num_workers, max_pixels=max_pixels,
                               max_bad_fraction=max_bad_fraction, decoded_cache_bytes=decoded_cache_bytes)
        self._bad = self.decoder.bad

    # ---- public API ----------------------------------------------------------------------

    def __len__(self) -> int:
        """Batches in one training epoch, assuming every image decodes."""
        if self.buckets is not None:
            return sum(batches_in(n, self.batch_size, self.drop_last) for _, n in self.bucket_counts())
        return batches_in(len(self.samples), self.batch_size, self.drop_last)

    def bucket_counts(self) -> list[tuple[tuple[int, int], int]]:
        """((height, width) at the current image size, samples) for every aspect-ratio bucket."""
        if self.buckets is None:
            return []
        assigned = self._assignment()
        members = np.bincount(assigned[assigned >= 0], minlength=len(self.buckets))
        return [(self.bucket_shape(b), int(members[b])) for b in range(len(self.buckets))]

    def bucket_shape(self, bucket: int) -> tuple[int, int]:
        assert self.buckets is not None
        return self.buckets[bucket].shape(self.image_size, self.patch_size, self._base_grid)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def bad_files(self) -> list[tuple[str, str]]:
        """(path, reason) for every sample that failed to decode, in the order they were met."""
        return self._bad.files()

    def order(self, epoch: int) -> np.ndarray:
        """The sample indices of `epoch`, in visiting order."""
        return self.sample_order.epoch(epoch)

    def next_batch(self) -> Batch:
        """The next training batch, rolling into the next epoch when this one is used up."""
        if self.drop_last and len(self.samples) < self.batch_size:
            raise DataError(
                f"the dataset has {len(self.samples)} samples, fewer than batch_size "
                f"{self.batch_size}, so drop_last=True leaves no batch"
            )
        for _ in range(2):
            batch = self._next_in_epoch()
            if batch is not None:
                return batch
            self._start_epoch(self._epoch + 1)
        # A whole fresh epoch gave no batch: every image is bad, or too few decode to fill one.
        usable = len(self.samples) - len(self._bad)
        raise DataError(
            f"only {usable} of {len(self.samples)} images decode, fewer than batch_size "
            f"{self.batch_size} (drop_last=True); bad files: {self._bad.summary()}"
        )

    def __iter__(self) -> Iterator[Batch]:
        """The remaining training batches of the current epoch; afterwards the next epoch starts."""
        if self._epoch_used_up():  # next_batch() finished this epoch exactly
            self._start_epoch(self._epoch + 1)
        while (batch := self._next_in_epoch()) is not None:
            yield batch
        self._start_epoch(self._epoch + 1)

    def _start_epoch(self, epoch: int) -> None:
        self._epoch, self._position = epoch, 0
        self._batch_index, self._bucket_positions = 0, [0] * len(self.buckets or ())

    def _epoch_used_up(self) -> bool:
        if self.buckets is not None:
            return self._batch_index >= len(self._schedule(self._epoch))
        return self._position >= len(self.samples)

    def iter_epoch(self) -> Iterator[Batch]:
        """One evaluation pass: dataset order, no augmentation, last partial batch kept.

        It leaves the training position untouched (bad files it meets are still recorded).
        """
        run = _Pass(epoch=0, order=np.arange(len(self.samples)), augment=False, drop_last=False)
        position = 0
        while True:
            batch, position = self._assemble(run, position)
            if batch is None:
                return
            self._prefetch(run, position)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready resume point: the epoch, the position in its order and the bad files."""
        state = {
            "seed": self.seed,
            "num_samples": len(self.samples),
            "epoch": self._epoch,
            "position": self._position,
            "bad_indices": list(self._bad.reasons),
            "bad_files": [[path, reason] for path, reason in self.bad_files],
        }
        if self.buckets is not None:
            state["buckets"] = self._bucket_grids()
            state["batch_index"] = self._batch_index
            state["bucket_positions"] = list(self._bucket_positions)
        return state

    def _bucket_grids(self) -> list[list[int]] | None:
        return None if self.buckets is None else [[b.rows, b.cols] for b in self.buckets]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`: the next batch is the one the saver would have made."""
        for key, mine in (("seed", self.seed), ("num_samples", len(self.samples))):
            if state.get(key) != mine:
                raise DataError(
                    f"cannot resume the data order: saved {key} is {state.get(key)}, this loader "
                    f"has {mine}; the dataset or seed changed since the checkpoint"
                )
        saved = state.get("buckets")
        if saved != self._bucket_grids():
            said = "without aspect-ratio buckets" if saved is None else f"with aspect-ratio buckets {saved}"
            mine = "without" if self.buckets is None else f"with buckets {self._bucket_grids()}"
            raise DataError(f"cannot resume the data order: the checkpoint was made {said}, this run is {mine}; "
                            "resume with the same --buckets setting and image size")
        self._epoch = int(state["epoch"])
        self._position = int(state["position"])
        if self.buckets is not None:
            self._batch_index = int(state["batch_index"])
            self._bucket_positions = [int(p) for p in state["bucket_positions"]]
        reasons = [reason for _, reason in state["bad_files"]]
        self._bad.reasons = {int(i): r for i, r in zip(state["bad_indices"], reasons, strict=True)}
        self.decoder.cancel_ahead()

    def close(self) -> None:
        self.decoder.close()

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- assembling batches ---------------------------------------------------------------

    def _next_in_epoch(self) -> Batch | None:
        if self.buckets is not None:
            return self._next_bucketed()
        run = _Pass(self._epoch, self.order(self._epoch), self.augment, self.drop_last)
        batch, position = self._assemble(run, self._position)
        # With drop_last a short tail is skipped, so the epoch counts as finished either way.
        self._position = position if batch is not None else len(run.order)
        if batch is not None:
            if position < len(run.order):
                self._prefetch(run, position)
            else:
                following = self._epoch + 1
                upcoming = _Pass(following, self.order(following), self.augment, self.drop_last)
                self._prefetch(upcoming, 0)
        return batch

    # ---- aspect-ratio buckets ------------------------------------------------------------

    def _next_bucketed(self) -> Batch | None:
        schedule = self._schedule(self._epoch)
        while self._batch_index < len(schedule):
            bucket = int(schedule[self._batch_index])
            batch, position = self._assemble(self._bucket_pass(self._epoch, bucket), self._bucket_positions[bucket])
            self._bucket_positions[bucket] = position
            self._batch_index += 1
            if batch is not None:
                self._prefetch_bucketed()
                return batch
        return None  # the buckets ran out of decodable images before the schedule did

    def _prefetch_bucketed(self) -> None:
        epoch, index, positions = self._epoch, self._batch_index, self._bucket_positions
        if index >= len(self._schedule(epoch)):
            epoch, index, positions = epoch + 1, 0, [0] * len(self.buckets)
            if not len(self._schedule(epoch)):
                return
        bucket = int(self._schedule(epoch)[index])
        self._prefetch(self._bucket_pass(epoch, bucket), positions[bucket])

    def _bucket_pass(self, epoch: int, bucket: int) -> _Pass:
        return _Pass(epoch, self._bucket_order(epoch)[bucket], self.augment, self.drop_last,
                     shape=self.bucket_shape(bucket))

    def _bucket_order(self, epoch: int) -> list[np.ndarray]:
        return self.sample_order.by_bucket(epoch)

    def _schedule(self, epoch: int) -> np.ndarray:
        return self.sample_order.schedule(epoch)

    def _assignment(self) -> np.ndarray:
        """Each sample's bucket, from its image's header (EXIF rotation applied); a file whose
        header cannot be read is recorded as bad, as a failed decode would be, and gets -1."""
        if self._bucket_of is None:
            sizes = self.decoder.headers(sorted({s.image for s in self.samples}, key=str))
            bucket_of = np.full(len(self.samples), -1, np.int64)
            for index, sample in enumerate(self.samples):
                size = sizes[sample.image]
                if isinstance(size, ImageError):
                    self._bad.record(index, str(size))
                else:
                    bucket_of[index] = nearest_bucket(*size, self.buckets)
            self._bucket_of = bucket_of
        return self._bucket_of

    def _assemble(self, run: _Pass, position: int) -> tuple[Batch | None, int]:
        """The first batch_size samples from `position` that decode, and the position after.

        (None, end of order) when the order runs out first and the pass drops a short batch.
        """
        picked: list[tuple[int, np.ndarray]] = []
        pending: deque[tuple[int, Future | None]] = deque()
        end = len(run.order)
        while len(picked) < self.batch_size:
            # Keep exactly as many decodes in flight as slots are still empty: the result never
            # depends on timing, and nothing is decoded past the batch unless a slot failed.
            while len(pending) < self.batch_size - len(picked) and position < end:
                index = int(run.order[position])
                pending.append((index, self.decoder.submit(index, run, _key(run, index))))
                position += 1
            if not pending:
                break
            index, future = pending.popleft()
            outcome = result(future)
            if isinstance(outcome, ImageError):
                self._bad.record(index, str(outcome))
            elif outcome is not None:
                picked.append((index, outcome))
        if not picked or (len(picked) < self.batch_size and run.drop_last):
            return None, end
        return self._batch(picked), position

    def _prefetch(self, run: _Pass, position: int) -> None:
        """Start decoding the samples the next batch will most likely take."""
        indices = (int(i) for i in run.order[position:position + self.batch_size])
        self.decoder.prefetch(run, [(index, _key(run, index)) for index in indices])

    def set_image_size(self, image_size: int) -> None:
        """Batches from now on at `image_size` (a resolution schedule). Work prefetched at the old
        size is dropped; the augmentation of a sample depends on its seed, not on when it is made,
        so a resumed run gets the same pixels."""
        check_int("image_size", image_size, minimum=1)
        if image_size != self.image_size:
            self.decoder.cancel_ahead()
            self.image_size = image_size

    def _load(self, index: int, run: _Pass) -> np.ndarray | ImageError:
        """Worker: decode and transform one sample; an ImageError is returned, not raised."""
        try:
            image = self.decoder.decoded(index)
        except ImageError as err:
            return err
        size = run.shape or self.image_size
        if not run.augment:
            return preprocess(image, size, mean=self.mean, std=self.std, crop=self.crop)
        rng = np.random.default_rng([self.seed, run.epoch, index])
        crop = random_resized_crop(image, size, rng, scale=self.crop_scale)
        return normalize(np.asarray(crop), self.mean, self.std)

    def _batch(self, picked: list[tuple[int, np.ndarray]]) -> Batch:
        indices = np.array([i for i, _ in picked], dtype=np.int64)
        chosen = [self.samples[i] for i in indices]
        input_ids = np.asarray(self.tokenize([s.caption for s in chosen])).astype(np.int64)
        if input_ids.shape[0] != len(chosen):
            raise ConfigError(
                f"tokenize returned {input_ids.shape[0]} rows for {len(chosen)} captions"
            )
        labels = np.array([s.label for s in chosen], dtype=np.int64) if self._has_labels else None
        return Batch(
            pixels=np.stack([pixels for _, pixels in picked]),
            input_ids=input_ids,
            labels=labels,
            image_ids=np.array([s.image_id for s in chosen], dtype=np.int64),
            indices=indices,
            multi_positive=self.multi_positive,
        )


def _key(run: _Pass, index: int) -> tuple:
    # Without augmentation a sample's pixels do not depend on the epoch.
    return (run.augment, run.epoch if run.augment else -1, index, run.shape)
