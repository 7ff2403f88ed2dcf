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
(`data.decode`), the bucket plan (`data.bucketed`), and the transform (crop, resize, normalise) and
collate into a `Batch` (`data.collate`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlx_clip.data.bucketed import BucketPlan, check_same_buckets
from mlx_clip.data.buckets import Bucket, batches_in
from mlx_clip.data.collate import Batch, Tokenize, Transform, collate
from mlx_clip.data.decode import Decoder, result
from mlx_clip.data.order import SeededOrder
from mlx_clip.data.sample import Sample
from mlx_clip.data.table import SampleTable
from mlx_clip.errors import ConfigError, DataError, ImageError, check_int
from mlx_clip.model.image_processing import DEFAULT_MAX_PIXELS, OPENAI_MEAN, OPENAI_STD

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
        share: tuple[int, int] = (0, 1),
        agree: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        """`share=(rank, processes)` with `agree` (an element-wise sum over the processes): each
        process decodes only its slice of every batch, and the processes agree on which images
        decode, so the batch is still the one a single process would make (`_assemble_shared`)."""
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
        self.rank, self.processes = share
        if self.processes > 1 and agree is None:
            raise ConfigError("a loader shared by several processes needs `agree`, their collective sum")
        self.agree = agree
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
        self.transform = Transform(tuple(mean), tuple(std), crop, crop_scale, seed)
        self._epoch = 0
        self._position = 0  # next place in the current epoch's order
        self.decoder = Decoder(self.samples, self._load, num_workers=num_workers, max_pixels=max_pixels,
                               max_bad_fraction=max_bad_fraction, decoded_cache_bytes=decoded_cache_bytes)
        self._bad = self.decoder.bad
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
        schedule, plan = self._schedule(self._epoch), self.plan
        while plan.batch_index < len(schedule):
            bucket = int(schedule[plan.batch_index])
            batch, position = self._assemble(self._bucket_pass(self._epoch, bucket), plan.positions[bucket])
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
        self._prefetch(self._bucket_pass(epoch, bucket), positions[bucket])

    def _bucket_pass(self, epoch: int, bucket: int) -> _Pass:
        return _Pass(epoch, self._bucket_order(epoch)[bucket], self.augment, self.drop_last,
                     shape=self.bucket_shape(bucket))

    def _bucket_order(self, epoch: int) -> list[np.ndarray]:
        return self.sample_order.by_bucket(epoch)

    def _schedule(self, epoch: int) -> np.ndarray:
        return self.sample_order.schedule(epoch)

    def _assemble(self, run: _Pass, position: int) -> tuple[Batch | None, int]:
        """The first batch_size samples from `position` that decode, and the position after.

        (None, end of order) when the order runs out first and the pass drops a short batch.
        """
        if self.processes > 1 and run.drop_last:  # training; an evaluation pass is made whole
            return self._assemble_shared(run, position)
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
        """Start decoding the samples the next batch will most likely take (this process's share)."""
        start, stop = position, position + self.batch_size
        if self.processes > 1 and run.drop_last:
            per = self.batch_size // self.processes
            start, stop = position + self.rank * per, position + (self.rank + 1) * per
        indices = (int(i) for i in run.order[start:stop])
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
        return self.transform(image, run.shape or self.image_size, augment=run.augment, epoch=run.epoch, index=index)

    def _batch(self, picked: list[tuple[int, np.ndarray]]) -> Batch:
        return collate(self.samples, [i for i, _ in picked], [p for _, p in picked], self.tokenize,
                       multi_positive=self.multi_positive)

    def _assemble_shared(self, run: _Pass, position: int) -> tuple[Batch | None, int]:
        """`_assemble` with each process decoding only its share. The candidates of a round (the
        next samples, as many as slots are empty) are split into contiguous parts, one per process;
        each decodes its part and `agree` sums the outcomes (1: decodes, 2: bad), so every process
        knows the same batch and records the same bad files. With no bad file a process decodes
        exactly its slice of the batch; otherwise the few images of its slice another process
        decoded are decoded here again."""
        kept: list[int] = []
        mine: dict[int, np.ndarray] = {}
        errors: dict[int, ImageError] = {}
        end = len(run.order)
        while len(kept) < self.batch_size and position < end:
            candidates = [int(i) for i in run.order[position:position + self.batch_size - len(kept)]]
            position += len(candidates)
            lo, hi = (self.rank * len(candidates) // self.processes,
                      (self.rank + 1) * len(candidates) // self.processes)
            outcome = np.zeros(len(candidates), np.int64)
            futures = {j: self.decoder.submit(candidates[j], run, _key(run, candidates[j])) for j in range(lo, hi)}
            for j, future in futures.items():
                result_of = result(future)
                if isinstance(result_of, np.ndarray):
                    outcome[j], mine[candidates[j]] = 1, result_of
                elif isinstance(result_of, ImageError):
                    outcome[j], errors[candidates[j]] = 2, result_of
            agreed = self.agree(outcome)
            for j, index in enumerate(candidates):
                if agreed[j] == 1:
                    kept.append(index)
                elif agreed[j] == 2 and index not in self._bad:  # every process names the same reason
                    self._bad.record(index, str(errors[index] if index in errors else self._load(index, run)))
        if not kept or len(kept) < self.batch_size:  # training drops a short batch
            return None, end
        per = self.batch_size // self.processes
        rows = slice(self.rank * per, (self.rank + 1) * per)
        pixels = [mine[i] if i in mine else self._load(i, run) for i in kept[rows]]
        return collate(self.samples, kept, pixels, self.tokenize, multi_positive=self.multi_positive,
                       pixel_rows=rows), position

def _key(run: _Pass, index: int) -> tuple:
    # Without augmentation a sample's pixels do not depend on the epoch.
    return (run.augment, run.epoch if run.augment else -1, index, run.shape)
