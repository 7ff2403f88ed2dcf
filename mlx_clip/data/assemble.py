"""How one batch is made from a pass over the data and a place in it: the next samples that decode,
decoded on threads (`data.decode`), transformed and collated (`data.collate`); with several
processes, each decoding only its share while they agree on which images decode."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from mlx_clip.data.collate import Batch, Tokenize, Transform, collate
from mlx_clip.data.decode import Decoder, result
from mlx_clip.data.sample import Sample
from mlx_clip.errors import ConfigError, ImageError


@dataclass(frozen=True)
class Pass:
    """One pass over the data: which order, whether to augment and to keep a partial last batch."""

    epoch: int
    order: np.ndarray
    augment: bool
    drop_last: bool
    shape: tuple[int, int] | None = None  # (height, width) of an aspect-ratio bucket; else square


class BatchMaker:
    def __init__(self, samples: Sequence[Sample], *, batch_size: int, image_size: int, tokenize: Tokenize,
                 transform: Transform, multi_positive: bool, decoder_options: dict,
                 share: tuple[int, int] = (0, 1), agree: Callable[[np.ndarray], np.ndarray] | None = None):
        self.samples, self.batch_size, self.image_size = samples, batch_size, image_size
        self.tokenize, self.transform, self.multi_positive = tokenize, transform, multi_positive
        self.rank, self.processes = share
        if self.processes > 1 and agree is None:
            raise ConfigError("a loader shared by several processes needs `agree`, their collective sum")
        self.agree = agree
        self.decoder = Decoder(samples, self._load, **decoder_options)
        self._bad = self.decoder.bad

    def assemble(self, run: Pass, position: int) -> tuple[Batch | None, int]:
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
                pending.append((index, self.decoder.submit(index, run, pass_key(run, index))))
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

    def prefetch(self, run: Pass, position: int) -> None:
        """Start decoding the samples the next batch will most likely take (this process's share)."""
        start, stop = position, position + self.batch_size
        if self.processes > 1 and run.drop_last:
            per = self.batch_size // self.processes
            start, stop = position + self.rank * per, position + (self.rank + 1) * per
        indices = (int(i) for i in run.order[start:stop])
        self.decoder.prefetch(run, [(index, pass_key(run, index)) for index in indices])

    def _load(self, index: int, run: Pass) -> np.ndarray | ImageError:
        """Worker: decode and transform one sample; an ImageError is returned, not raised."""
        try:
            image = self.decoder.decoded(index)
        except ImageError as err:
            return err
        return self.transform(image, run.shape or self.image_size, augment=run.augment, epoch=run.epoch, index=index)

    def _batch(self, picked: list[tuple[int, np.ndarray]]) -> Batch:
        return collate(self.samples, [i for i, _ in picked], [p for _, p in picked], self.tokenize,
                       multi_positive=self.multi_positive)

    def _assemble_shared(self, run: Pass, position: int) -> tuple[Batch | None, int]:
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
            futures = {j: self.decoder.submit(candidates[j], run, pass_key(run, candidates[j])) for j in range(lo, hi)}
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

def pass_key(run: Pass, index: int) -> tuple:
    # Without augmentation a sample's pixels do not depend on the epoch.
    return (run.augment, run.epoch if run.augment else -1, index, run.shape)
