"""The loader's decoding half: a thread pool, decodes started ahead for the next batch, a cache of
decoded images, and the ledger of files that could not be read.

What a sample becomes is decided by the loader (`load(index, run)`); this part only decides when
and on which thread it happens, and never changes a result: a decode started ahead is keyed by
everything its pixels depend on, so a stale one is never taken for another.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from mlx_clip.data.sample import Sample
from mlx_clip.data.stream import StoredImage
from mlx_clip.errors import DataError, ImageError
from mlx_clip.model.image_processing import image_size_of, open_image

Load = Callable[[int, object], "np.ndarray | ImageError"]  # (sample index, pass) -> pixels or the error


class BadFiles:
    """Samples whose image failed, with the reason, in the order they were met; the run stops
    once more than `max_fraction` of the dataset is bad."""

    def __init__(self, samples: Sequence[Sample], max_fraction: float):
        self.samples, self.max_fraction = samples, max_fraction
        self.reasons: dict[int, str] = {}  # sample index -> reason

    def __contains__(self, index: int) -> bool:
        return index in self.reasons

    def __len__(self) -> int:
        return len(self.reasons)

    def record(self, index: int, reason: str) -> None:
        self.reasons.setdefault(index, reason)
        # Judged against the whole dataset, not the samples seen so far, so one bad file early on
        # cannot stop a run whose data is 99% fine; a dataset over the limit still fails within
        # its first epoch.
        if len(self.reasons) > self.max_fraction * len(self.samples):
            raise DataError(
                f"{len(self.reasons)} of {len(self.samples)} images could not be read, more than "
                f"max_bad_fraction {self.max_fraction:g}: {self.summary()}"
            )

    def summary(self, limit: int = 3) -> str:
        shown = "; ".join(reason for reason in list(self.reasons.values())[:limit])
        more = len(self.reasons) - limit
        return shown + (f"; and {more} more" if more > 0 else "") if shown else "none"

    def files(self) -> list[tuple[str, str]]:
        """(path, reason) for every bad sample, in the order they were met."""
        return [(str(self.samples[i].image), reason) for i, reason in self.reasons.items()]


class Decoder:
    def __init__(self, samples: Sequence[Sample], load: Load, *, num_workers: int, max_pixels: int | None,
                 max_bad_fraction: float, decoded_cache_bytes: int):
        self.samples, self.load, self.num_workers, self.max_pixels = samples, load, num_workers, max_pixels
        self.bad = BadFiles(samples, max_bad_fraction)
        self.decoded_cache_bytes = decoded_cache_bytes
        self._decoded_cache: dict[Path, Image.Image] = {}
        self._decoded_bytes = 0
        self._cache_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        # Decodes started for the batch after the one just returned, so that they overlap the
        # training step. Keyed by what determines their result, so a stale entry is never wrong.
        self._ahead: dict[Hashable, Future] = {}

    def submit(self, index: int, run, key: Hashable) -> Future | None:
        """Sample `index` decoded for `run` (None: known bad, skipped without decoding again)."""
        if index in self.bad:
            return None
        ahead = self._ahead.pop(key, None)
        if ahead is not None:
            return ahead
        if self.num_workers == 0:
            done: Future = Future()
            done.set_result(self.load(index, run))
            return done
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="mlxclip-decode")
        return self._pool.submit(self.load, index, run)

    def prefetch(self, run, wanted: list[tuple[int, Hashable]]) -> None:
        """Start decoding the (index, key) pairs the next batch will most likely take; drop the rest."""
        if self.num_workers == 0:
            return
        stale, self._ahead = self._ahead, {}
        for index, key in wanted:
            if index not in self.bad:
                self._ahead[key] = stale.pop(key, None) or self.submit(index, run, key)
        for future in stale.values():
            future.cancel()

    def cancel_ahead(self) -> None:
        for future in self._ahead.values():
            future.cancel()
        self._ahead = {}

    def close(self) -> None:
        self.cancel_ahead()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def decoded(self, index: int) -> Image.Image:
        """The decoded image, kept in memory while the cache budget allows: a small domain is
        decoded once instead of once per epoch. Decoding is deterministic, so results are equal."""
        path = self.samples[index].image
        cached = self._decoded_cache.get(path)
        if cached is not None:
            return cached
        image = open_stored(path, self.max_pixels) if isinstance(path, StoredImage) else \
            open_image(path, max_pixels=self.max_pixels)
        size = image.width * image.height * 3
        with self._cache_lock:
            if self._decoded_bytes + size <= self.decoded_cache_bytes:
                self._decoded_cache[path] = image
                self._decoded_bytes += size
        return image

    def header(self, path: Path) -> tuple[int, int] | ImageError:
        """(width, height) from the file's header, EXIF rotation applied; the error, not raised."""
        try:
            return image_size_of(path, max_pixels=self.max_pixels)
        except ImageError as err:
            return err

    def headers(self, paths: list[Path]) -> dict[Path, tuple[int, int] | ImageError]:
        if self.num_workers and len(paths) > 1:
            with ThreadPoolExecutor(self.num_workers, thread_name_prefix="mlxclip-header") as pool:
                return dict(zip(paths, pool.map(self.header, paths)))
        return {path: self.header(path) for path in paths}


def open_stored(image: StoredImage, max_pixels: int | None) -> Image.Image:
    """Decode an image kept inside a shard; errors name the shard and key, not "<bytes>"."""
    try:
        return open_image(image.read(), max_pixels=max_pixels)
    except ImageError as err:
        raise ImageError(str(err).replace("<bytes>", image.where)) from None
    except OSError as err:
        raise ImageError(f"cannot read image {image.where}: {err}") from None


def result(future: Future | None) -> np.ndarray | ImageError | None:
    return None if future is None else future.result()
