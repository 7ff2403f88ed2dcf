"""The micro-batcher on its own: batch bounds, answers to the right caller in order, failures
reach only the callers of the failed batch."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from mlx_clip.serve.batching import MicroBatcher


def _run(coro):
    return asyncio.run(coro)


def test_rows_come_back_to_their_caller_in_order_and_batches_stay_bounded():
    calls = []

    def engine(rows):
        calls.append(len(rows))
        return rows * 2.0

    async def main():
        batcher = MicroBatcher(engine, ThreadPoolExecutor(1), max_batch_size=8, max_wait_ms=50)
        batcher.start()
        sizes = [1, 3, 2, 8, 11, 1, 5]  # 11 > max: split into jobs of 8 and 3
        inputs = [np.arange(n, dtype=np.float32)[:, None] + 100 * i for i, n in enumerate(sizes)]
        outs = await asyncio.gather(*(batcher.submit(x) for x in inputs))
        await batcher.stop()
        return inputs, outs

    inputs, outs = _run(main())
    for x, y in zip(inputs, outs):
        np.testing.assert_array_equal(y, x * 2.0)
    assert sum(calls) == 31 and max(calls) <= 8 and len(calls) < 7


def test_unbatched_runs_every_row_alone():
    calls = []

    async def main():
        batcher = MicroBatcher(lambda r: calls.append(len(r)) or r, ThreadPoolExecutor(1), max_batch_size=1,
                               max_wait_ms=50)
        batcher.start()
        await asyncio.gather(*(batcher.submit(np.zeros((2, 1))) for _ in range(3)))
        await batcher.stop()

    _run(main())
    assert calls == [1] * 6


def test_a_lone_request_does_not_wait_when_nothing_else_is_coming():
    async def main():
        batcher = MicroBatcher(lambda r: r, ThreadPoolExecutor(1), max_batch_size=8, max_wait_ms=2000,
                               expecting=lambda: False)
        batcher.start()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await batcher.submit(np.zeros((1, 1)))
        elapsed = loop.time() - started
        await batcher.stop()
        return elapsed

    assert _run(main()) < 1.0


def test_an_engine_failure_reaches_its_callers_and_the_worker_goes_on():
    def engine(rows):
        if (rows < 0).any():
            raise ValueError("negative input")
        return rows

    async def main():
        batcher = MicroBatcher(engine, ThreadPoolExecutor(1), max_batch_size=1, max_wait_ms=0)
        batcher.start()
        bad = await asyncio.gather(batcher.submit(-np.ones((1, 1))), return_exceptions=True)
        good = await batcher.submit(np.ones((1, 1)))
        await batcher.stop()
        return bad, good

    bad, good = _run(main())
    assert isinstance(bad[0], ValueError) and good[0, 0] == 1.0


def test_max_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="max_batch_size"):
        MicroBatcher(lambda r: r, ThreadPoolExecutor(1), max_batch_size=0, max_wait_ms=1)
