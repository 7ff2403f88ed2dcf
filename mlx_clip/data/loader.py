"""Batches of (pixels, token ids) in a seeded order: a pure function of (seed, epoch, position).

Epoch `e` visits the samples in `np.random.default_rng([seed, e]).permutation(n)`; a batch is the
next `batch_size` samples in that order that decode, so a bad file is replaced by the sample after
it. The augmentation of a sample draws from `default_rng([seed, e, index])`. Nothing depends on
thread timing or on what was loaded before, which is what makes `state_dict()` an exact resume
point: a restored loader yields, bytes included, the batch the original would have yielded next.

With aspect-ratio buckets (`buckets=True`, see `mlx_clip.data.buckets`) the same order is split by
bucket, each batch takes the next samples of one bucket, and which bucket comes next follows a
seeded schedule per epoch; the resume point is then the schedule entry and each bucket's position.

The loader keeps the epoch, the place in it and the resume state, over the seeded order
(`data.order`) and the bucket plan (`data.bucketed`); a batch is made by `data.assemble`, which
decodes on threads with the bad-file ledger (`data.decode`), transforms and collates
(`data.collate`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from mlx_clip.data.assemble import BatchMaker, Pass
from mlx_clip.data.bucketed import BucketPlan, check_same_buckets
from mlx_clip.data.buckets import Bucket, batches_in
from mlx_clip.data.collate import Batch, NaflexTransform, Tokenize, Transform
from mlx_clip.data.order import SeededOrder
from mlx_clip.data.sample import Sample
from mlx_clip.data.table import SampleTable
from mlx_clip.errors import ConfigError, DataError, check_int
from mlx_clip.model.image_processing import DEFAULT_MAX_PIXELS, OPENAI_MEAN, OPENAI_STD

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
        share: tuple[int, int] = (0, 1),
        agree: Callable[[np.ndarray], np.ndarray] | None = None,
        naflex=None,
    ) -> None:
        """`share=(rank, processes)` with `agree` (an element-wise sum over the processes): each
        process decodes only its slice of every batch, and the processes agree on which images
        decode, so the batch is still the one a single process would make (`_assemble_shared`).
        `naflex` (a `naflex.NaflexProcessor`): images become packed patches within its budget,
        each keeping its aspect ratio (`collate.NaflexTransform`), instead of square pixels."""
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
        self.seed = seed
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.max_bad_fraction = max_bad_fraction
        self.max_pixels = max_pixels
        self._epoch = 0
        self._position = 0  # next place in the current epoch's order
        self.maker = BatchMaker(
            samples, batch_size=batch_size, image_size=image_size, tokenize=tokenize,
            transform=NaflexTransform(naflex, crop_scale, seed) if naflex is not None else
            Transform(tuple(mean), tuple(std), crop, crop_scale, seed), multi_positive=multi_positive,
            decoder_options=dict(num_workers=num_workers, max_pixels=max_pixels, max_bad_fraction=max_bad_fraction,
                                 decoded_cache_bytes=decoded_cache_bytes), share=share, agree=agree)
        self.decoder, self._bad = self.maker.decoder, self.maker.decoder.bad
        self.plan = BucketPlan(self.samples, image_size, patch_size, headers=self.decoder.headers, bad=self._bad) \
            if buckets else None
        self.sample_order = SeededOrder(len(self.samples), seed, shuffle=shuffle, batch_size=batch_size,
                                        drop_last=drop_last, buckets=len(self.buckets or ()),
                                        bucket_of=self._assignment, shard_sizes=getattr(samples, "shard_sizes", None))

    # ---- public API ----------------------------------------------------------------------

    def __len__(self) -> int:
        """Batches in one training epoch, assuming every image decodes."""
        if self.plan is not None:
            return sum(batches_in(n, self.batch_size, self.drop_last) for _, n in self.bucket_counts())
        return batches_in(len(self.samples), self.batch_size, self.drop_last)

    @property
    def buckets(self) -> list[Bucket] | None:
        return None if self.plan is None else self.plan.buckets

    def bucket_counts(self) -> list[tuple[tuple[int, int], int]]:
        """((height, width) at the current image size, samples) for every aspect-ratio bucket."""
        return [] if self.plan is None else self.plan.counts(self.image_size)

    def bucket_shape(self, bucket: int) -> tuple[int, int]:
        return self.plan.shape(bucket, self.image_size)

    def _assignment(self) -> np.ndarray:
        return self.plan.assignment()

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
        if self.plan is not None:
            self.plan.restart()

    def _epoch_used_up(self) -> bool:
        if self.plan is not None:
            return self.plan.batch_index >= len(self._schedule(self._epoch))
        return self._position >= len(self.samples)

    def iter_epoch(self) -> Iterator[Batch]:
        """One evaluation pass: dataset order, no augmentation, last partial batch kept.

        It leaves the training position untouched (bad files it meets are still recorded).
        """
        run = Pass(epoch=0, order=np.arange(len(self.samples)), augment=False, drop_last=False)
        position = 0
        while True:
            batch, position = self.maker.assemble(run, position)
            if batch is None:
                return
            self.maker.prefetch(run, position)
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
        if self.plan is not None:
            state.update(self.plan.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`: the next batch is the one the saver would have made."""
        for key, mine in (("seed", self.seed), ("num_samples", len(self.samples))):
            if state.get(key) != mine:
                raise DataError(
                    f"cannot resume the data order: saved {key} is {state.get(key)}, this loader "
                    f"has {mine}; the dataset or seed changed since the checkpoint"
                )
        check_same_buckets(state.get("buckets"), self.plan)
        self._epoch = int(state["epoch"])
        self._position = int(state["position"])
        if self.plan is not None:
            self.plan.load_state_dict(state)
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
        if self.plan is not None:
            return self._next_bucketed()
        run = Pass(self._epoch, self.order(self._epoch), self.augment, self.drop_last)
        batch, position = self.maker.assemble(run, self._position)
        # With drop_last a short tail is skipped, so the epoch counts as finished either way.
        self._position = position if batch is not None else len(run.order)
        if batch is not None:
            if position < len(run.order):
                self.maker.prefetch(run, position)
            else:
                following = self._epoch + 1
                upcoming = Pass(following, self.order(following), self.augment, self.drop_last)
                self.maker.prefetch(upcoming, 0)
        return batch

    # ---- aspect-ratio buckets ------------------------------------------------------------

    def _next_bucketed(self) -> Batch | None:
        schedule, plan = self._schedule(self._epoch), self.plan
        while plan.batch_index < len(schedule):
            bucket = int(schedule[plan.batch_index])
            batch, position = self.maker.assemble(self._bucket_pass(self._epoch, bucket), plan.positions[bucket])
            plan.positions[bucket] = position
            plan.batch_index += 1
            if batch is not None:
                self._prefetch_bucketed()
                return batch
        return None  # the buckets ran out of decodable images before the schedule did

    def _prefetch_bucketed(self) -> None:
        epoch, index, positions = self._epoch, self.plan.batch_index, self.plan.positions
        if index >= len(self._schedule(epoch)):
            epoch, index, positions = epoch + 1, 0, [0] * len(self.buckets)
            if not len(self._schedule(epoch)):
                return
        bucket = int(self._schedule(epoch)[index])
        self.maker.prefetch(self._bucket_pass(epoch, bucket), positions[bucket])

    def _bucket_pass(self, epoch: int, bucket: int) -> Pass:
        return Pass(epoch, self._bucket_order(epoch)[bucket], self.augment, self.drop_last,
                     shape=self.bucket_shape(bucket))

    def _bucket_order(self, epoch: int) -> list[np.ndarray]:
        return self.sample_order.by_bucket(epoch)

    def _schedule(self, epoch: int) -> np.ndarray:
        return self.sample_order.schedule(epoch)

    @property
    def image_size(self) -> int:
        return self.maker.image_size

    def set_image_size(self, image_size: int) -> None:
        """Batches from now on at `image_size` (a resolution schedule). Work prefetched at the old
        size is dropped; the augmentation of a sample depends on its seed, not on when it is made,
        so a resumed run gets the same pixels."""
        check_int("image_size", image_size, minimum=1)
        if image_size != self.image_size:
            self.decoder.cancel_ahead()
            self.maker.image_size = image_size

