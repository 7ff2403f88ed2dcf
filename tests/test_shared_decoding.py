"""Several processes, each decoding only its share of every batch, still make the batches one process
makes: same samples, same pixels row for row, same bad files. The processes are simulated by
threads whose `agree` is a real element-wise sum across them (what `rank_sum` is on each engine);
`tests/test_distributed.py` and `tests/test_streamed_data.py` check the same under the launchers."""

import threading

import numpy as np
import pytest
from PIL import Image

from mlx_clip.data.decode import Decoder
from mlx_clip.data.loader import BatchLoader
from mlx_clip.data.sample import Sample

BATCH, IMAGES, STEPS = 8, 40, 12


class Summed:
    """An element-wise sum over `parties` threads, called in the same order by each (a collective)."""

    def __init__(self, parties: int):
        self.parties, self.lock = parties, threading.Lock()
        self.barrier = threading.Barrier(parties)
        self.total: np.ndarray | None = None

    def __call__(self, values: np.ndarray) -> np.ndarray:
        with self.lock:
            self.total = values.copy() if self.total is None else self.total + values
        self.barrier.wait()
        summed = self.total.copy()
        if self.barrier.wait() == 0:
            self.total = None
        self.barrier.wait()
        return summed


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(root / f"{i:03d}.png")
    for i in (3, 11, 12, 30):  # bad files, two of them side by side
        (root / f"{i:03d}.png").write_bytes(b"not a png")
    return root


def _loader(folder, **kwargs) -> BatchLoader:
    samples = [Sample(folder / f"{i:03d}.png", f"image {i}", None, i) for i in range(IMAGES)]
    options = {"num_workers": 1, **kwargs}
    return BatchLoader(samples, batch_size=BATCH, image_size=16, seed=5, augment=True, max_bad_fraction=0.2,
                       tokenize=lambda texts: np.zeros((len(texts), 4), np.int64), **options)


def test_each_process_decodes_its_share_and_the_batches_are_one_process_batches(folder, monkeypatch):
    with _loader(folder) as alone:
        expected = [alone.next_batch() for _ in range(STEPS)]
        expected_bad = alone.bad_files

    decoded: dict[str, int] = {}
    original = Decoder.decoded

    def counting(self, index):
        name = threading.current_thread().name
        decoded[name] = decoded.get(name, 0) + 1
        return original(self, index)

    monkeypatch.setattr(Decoder, "decoded", counting)
    processes = 2
    agree = Summed(processes)
    got: dict[int, list] = {}
    bad: dict[int, list] = {}

    def rank(r: int) -> None:
        with _loader(folder, share=(r, processes), agree=agree, num_workers=0) as loader:
            got[r] = [loader.next_batch() for _ in range(STEPS)]
            bad[r] = loader.bad_files

    threads = [threading.Thread(target=rank, args=(r,), name=f"rank{r}") for r in range(processes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(got) == {0, 1}
    per = BATCH // processes
    for step, reference in enumerate(expected):
        for r in range(processes):
            batch = got[r][step]
            np.testing.assert_array_equal(batch.indices, reference.indices)  # the same global batch
            np.testing.assert_array_equal(batch.input_ids, reference.input_ids)
            rows = slice(r * per, (r + 1) * per)
            assert batch.pixel_rows == rows
            np.testing.assert_array_equal(batch.pixels_of(rows), reference.pixels[rows])  # bit for bit
    assert bad[0] == bad[1] == expected_bad and len(expected_bad) == 4
    # Each decoded about half: its own slices, plus a bad file's reason or a slice image its
    # neighbour decoded when a bad file shifted the split (4 bad files, a few each).
    images = STEPS * BATCH
    for r in range(processes):
        assert images // processes <= decoded[f"rank{r}"] <= images // processes + 3 * len(expected_bad)
