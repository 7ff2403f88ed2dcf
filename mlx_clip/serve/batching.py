"""Dynamic micro-batching: rows from concurrent requests share one engine call.

Each request's rows are queued as jobs of at most `max_batch_size` rows. A worker takes the first
waiting job, keeps taking jobs until the batch is full or `max_wait_ms` has passed since it began
waiting (it waits only while `expecting()` says more rows are on their way, e.g. images still being
decoded, so a lone request is not delayed for nothing), runs the engine once on the stacked rows (in the one engine thread, off the event loop)
and hands each job its own slice. A job never straddles two batches, so a request's answer is in
its own order. `max_batch_size=1` is the unbatched server the benchmark compares against.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Job:
    rows: np.ndarray
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Groups rows for `run((N, ...) array) -> (N, D) array`, executed on `executor`."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], executor: Executor, *, max_batch_size: int,
                 max_wait_ms: float, observe: Callable[[int, list[float], int], None] | None = None,
                 expecting: Callable[[], bool] = lambda: True):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.run, self.executor = run, executor
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000
        self.observe = observe  # (batch size, queue seconds per job, rows still waiting)
        self.expecting = expecting
        self._jobs: deque[_Job] = deque()
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task | None = None

    @property
    def waiting_rows(self) -> int:
        return sum(len(job.rows) for job in self._jobs)

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._serve())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        for job in self._jobs:
            job.future.cancel()

    async def submit(self, rows: np.ndarray) -> np.ndarray:
        """The engine's output for `rows`, in order, however they were batched."""
        loop = asyncio.get_running_loop()
        jobs = [_Job(rows[start:start + self.max_batch_size], loop.create_future())
                for start in range(0, len(rows), self.max_batch_size)]
        self._jobs.extend(jobs)
        self._arrived.set()
        return np.concatenate(await asyncio.gather(*(job.future for job in jobs)))

    async def _next_batch(self) -> list[_Job]:
        while not self._jobs:
            self._arrived.clear()
            await self._arrived.wait()
        batch = [self._jobs.popleft()]
        size = len(batch[0].rows)
        deadline = time.perf_counter() + self.max_wait
        while size < self.max_batch_size:
            if self._jobs:
                if size + len(self._jobs[0].rows) > self.max_batch_size:
                    break
                job = self._jobs.popleft()
                batch.append(job)
                size += len(job.rows)
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0 or not self.expecting():
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
        return batch

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            live = [job for job in batch if not job.future.done()]  # a caller that went away
            if not live:
                continue
            started = time.perf_counter()
            if self.observe is not None:
                self.observe(sum(len(j.rows) for j in live), [started - j.queued_at for j in live],
                             self.waiting_rows)
            try:
                out = await loop.run_in_executor(self.executor, self.run, np.concatenate([j.rows for j in live]))
            except Exception as err:  # the callers get the failure; the worker keeps serving
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(err)
                continue
            start = 0
            for job in live:
                if not job.future.done():
                    job.future.set_result(out[start:start + len(job.rows)])
                start += len(job.rows)
