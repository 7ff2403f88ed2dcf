"""The order a run visits its samples in: a pure function of (seed, epoch), so a checkpoint's
(epoch, position) is an exact resume point and nothing depends on thread timing.

Epoch `e` visits the samples in `np.random.default_rng([seed, e]).permutation(n)`. Data read in
shards (`data.stream`) is visited shard by shard instead: the shards in `default_rng([seed, e])`'s
permutation, the samples of shard `k` in a permutation of their own drawn from
`default_rng([seed, e, k, _IN_SHARD_STREAM, _IN_SHARD_STREAM])`, so one shard is read at a time. With
aspect-ratio buckets the same order is split by bucket (each keeps the order's sequence), and
which bucket's batch comes next follows a seeded schedule per epoch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mlx_clip.data.buckets import epoch_schedule

# The 4-word key of the bucket schedule's generator cannot equal a sample's 3-word augmentation key.
_SCHEDULE_STREAM = 0x6275636B
# The 5-word key of a shard's own permutation can equal neither of those.
_IN_SHARD_STREAM = 0x73686172


class SeededOrder:
    def __init__(self, num_samples: int, seed: int, *, shuffle: bool = True, batch_size: int = 1,
                 drop_last: bool = True, buckets: int = 0, bucket_of: Callable[[], np.ndarray] | None = None,
                 shard_sizes: np.ndarray | None = None):
        """`bucket_of()`: each sample's bucket (-1: none), asked for on first use (it reads headers).
        `shard_sizes`: samples per shard, for data read shard by shard."""
        self.shard_sizes = None if shard_sizes is None else np.asarray(shard_sizes, np.int64)
        if self.shard_sizes is not None and self.shard_sizes.sum() != num_samples:
            raise ValueError(f"shard sizes add up to {self.shard_sizes.sum()}, not {num_samples}")
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self.batch_size, self.drop_last = batch_size, drop_last
        self.buckets, self.bucket_of = buckets, bucket_of
        # Only the epoch in use and the one being prefetched into are kept.
        self._orders: dict[int, np.ndarray] = {}
        self._bucket_orders: dict[int, list[np.ndarray]] = {}
        self._schedules: dict[int, np.ndarray] = {}

    def epoch(self, epoch: int) -> np.ndarray:
        """The sample indices of `epoch`, in visiting order."""
        if epoch not in self._orders:
            rng = np.random.default_rng([self.seed, epoch])
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            n = self.num_samples
            if self.shard_sizes is not None and self.shuffle:
                self._orders[epoch] = self._shard_by_shard(epoch, rng)
            else:
                self._orders[epoch] = rng.permutation(n) if self.shuffle else np.arange(n)
        return self._orders[epoch]

    def _shard_by_shard(self, epoch: int, rng: np.random.Generator) -> np.ndarray:
        starts = np.concatenate([[0], np.cumsum(self.shard_sizes)[:-1]])
        parts = [starts[k] + np.random.default_rng([self.seed, epoch, int(k), _IN_SHARD_STREAM, _IN_SHARD_STREAM])
                 .permutation(int(self.shard_sizes[k])) for k in rng.permutation(len(self.shard_sizes))]
        return np.concatenate(parts) if parts else np.arange(0)

    def by_bucket(self, epoch: int) -> list[np.ndarray]:
        """The epoch's visiting order split by bucket."""
        if epoch not in self._bucket_orders:
            order = self.epoch(epoch)
            of = self.bucket_of()[order]
            self._bucket_orders = {e: o for e, o in self._bucket_orders.items() if e >= epoch - 1}
            self._bucket_orders[epoch] = [order[of == b] for b in range(self.buckets)]
        return self._bucket_orders[epoch]

    def schedule(self, epoch: int) -> np.ndarray:
        """The bucket of each of the epoch's batches, in order."""
        if epoch not in self._schedules:
            sizes = [len(o) for o in self.by_bucket(epoch)]
            rng = np.random.default_rng([self.seed, epoch, _SCHEDULE_STREAM, _SCHEDULE_STREAM])
            self._schedules = {e: s for e, s in self._schedules.items() if e >= epoch - 1}
            self._schedules[epoch] = epoch_schedule(sizes, self.batch_size, self.drop_last, rng)
        return self._schedules[epoch]
