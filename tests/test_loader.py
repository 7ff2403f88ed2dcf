"""BatchLoader: seeded order, exact resume, bad files skipped, pixels as the eval transform."""

import mlx_clip  # noqa: F401  (first, before anything imports mlx)

import json

import numpy as np
import pytest
from PIL import Image

from mlx_clip.data.loader import BatchLoader
from mlx_clip.data.sample import Sample
from mlx_clip.errors import DataError
from mlx_clip.model.image_processing import normalize, open_image, preprocess, random_resized_crop

SIZE = 16


def tokenize(captions: list[str]) -> np.ndarray:
    ids = np.zeros((len(captions), 77), np.int32)
    for row, caption in enumerate(captions):
        ids[row, 0] = int(caption.split()[-1])  # the sample number, so rows can be traced
    return ids


def make_samples(tmp_path, n: int, bad: tuple[int, ...] = (), labels: bool = False) -> list[Sample]:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        path = tmp_path / f"img{i}.png"
        if i in bad:
            path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        else:
            height, width = 16 + i % 7, 32 - i % 5
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        label = i % 3 if labels else None
        samples.append(Sample(path, f"caption {i}", label=label, image_id=100 + i))
    return samples


def make_loader(samples, **kwargs) -> BatchLoader:
    options = dict(batch_size=4, image_size=SIZE, tokenize=tokenize, seed=7, num_workers=2)
    options.update(kwargs)
    return BatchLoader(samples, **options)


def test_order_is_the_seeded_permutation(tmp_path):
    samples = make_samples(tmp_path, 10)
    with make_loader(samples, batch_size=5) as loader:
        seen = [loader.next_batch().indices for _ in range(6)]
    for epoch in range(3):
        expected = np.random.default_rng([7, epoch]).permutation(10)
        np.testing.assert_array_equal(np.concatenate(seen[2 * epoch : 2 * epoch + 2]), expected)
    with make_loader(samples, batch_size=5, seed=8) as other:
        assert not np.array_equal(other.next_batch().indices, seen[0])
    with make_loader(samples, batch_size=5, shuffle=False) as ordered:
        np.testing.assert_array_equal(ordered.next_batch().indices, np.arange(5))


def test_batch_contents(tmp_path):
    samples = make_samples(tmp_path, 9, labels=True)
    with make_loader(samples, num_workers=0) as loader:
        batch = loader.next_batch()
    assert batch.pixels.shape == (4, SIZE, SIZE, 3) and batch.pixels.dtype == np.float32
    assert batch.input_ids.shape == (4, 77) and batch.input_ids.dtype == np.int64
    np.testing.assert_array_equal(batch.input_ids[:, 0], batch.indices)
    np.testing.assert_array_equal(batch.image_ids, 100 + batch.indices)
    np.testing.assert_array_equal(batch.labels, batch.indices % 3)
    for row, index in enumerate(batch.indices):
        # the eval transform, itself held to transformers' CLIPImageProcessor
        expected = preprocess(open_image(samples[index].image), SIZE)
        np.testing.assert_array_equal(batch.pixels[row], expected)


def test_augmented_pixels_follow_the_per_sample_seed(tmp_path):
    samples = make_samples(tmp_path, 8)
    with make_loader(samples, augment=True, crop_scale=(0.3, 1.0)) as loader:
        batches = [loader.next_batch() for _ in range(3)]  # epochs 0, 0, 1
    for epoch, batch in zip((0, 0, 1), batches):
        for row, index in enumerate(batch.indices):
            rng = np.random.default_rng([7, epoch, int(index)])
            image = open_image(samples[index].image)
            crop = random_resized_crop(image, SIZE, rng, scale=(0.3, 1.0))
            np.testing.assert_array_equal(batch.pixels[row], normalize(np.asarray(crop)))
    assert batches[0].labels is None


def test_custom_normalization(tmp_path):
    samples = make_samples(tmp_path, 4)
    stats = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # SigLIP's preprocessor stats
    with make_loader(samples, shuffle=False, **stats) as loader:
        batch = loader.next_batch()
    expected = preprocess(open_image(samples[0].image), SIZE, **stats)
    np.testing.assert_array_equal(batch.pixels[0], expected)
    assert batch.pixels.min() >= -1.0 and batch.pixels.max() <= 1.0


def _run(loader: BatchLoader, steps: int) -> list:
    return [loader.next_batch() for _ in range(steps)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.indices, y.indices)
        assert x.pixels.tobytes() == y.pixels.tobytes()
        np.testing.assert_array_equal(x.input_ids, y.input_ids)


@pytest.mark.parametrize("augment", [False, True])
def test_resume_equals_uninterrupted(tmp_path, augment):
    samples = make_samples(tmp_path, 11, bad=(4,))
    kwargs = dict(augment=augment, crop_scale=(0.3, 1.0), max_bad_fraction=0.1)
    with make_loader(samples, **kwargs) as straight:
        reference = _run(straight, 8)  # 2 batches per epoch: crosses three epoch boundaries
    for stop in (1, 2, 3, 5):
        with make_loader(samples, **kwargs) as first:
            head = _run(first, stop)
            state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
        with make_loader(samples, num_workers=1, **kwargs) as resumed:
            resumed.load_state_dict(state)
            tail = _run(resumed, 8 - stop)
            assert resumed.bad_files == straight.bad_files
        _assert_same(head + tail, reference)


def test_worker_count_does_not_change_batches(tmp_path):
    samples = make_samples(tmp_path, 13, bad=(2,))
    runs = []
    for workers in (0, 1, 3):
        options = dict(num_workers=workers, augment=True, max_bad_fraction=0.1)
        with make_loader(samples, **options) as loader:
            runs.append(_run(loader, 7))
    _assert_same(runs[0], runs[1])
    _assert_same(runs[0], runs[2])


def test_each_sample_once_per_epoch(tmp_path):
    samples = make_samples(tmp_path, 23)
    with make_loader(samples) as loader:
        for epoch in range(2):
            indices = np.concatenate([b.indices for b in loader])
            order = np.random.default_rng([7, epoch]).permutation(23)
            # drop_last: 5 full batches; the last 3 of the order wait for another epoch
            assert len(indices) == 20 == len(set(indices.tolist()))
            np.testing.assert_array_equal(indices, order[:20])
        assert loader.epoch == 2
    with make_loader(samples, drop_last=False) as keep:
        batches = list(keep)
        assert [len(b.indices) for b in batches] == [4, 4, 4, 4, 4, 3]
        assert sorted(np.concatenate([b.indices for b in batches]).tolist()) == list(range(23))
        evaluated = list(keep.iter_epoch())
        np.testing.assert_array_equal(np.concatenate([b.indices for b in evaluated]), np.arange(23))
        assert len(evaluated[-1].indices) == 3
        assert keep.state_dict()["epoch"] == 1  # evaluation left the training position alone


def test_bad_image_skipped_and_counted(tmp_path):
    samples = make_samples(tmp_path, 21, bad=(6,))
    with make_loader(samples) as loader:
        order = np.random.default_rng([7, 0]).permutation(21)
        batches = _run(loader, 10)  # two epochs of 5 full batches
        assert all(len(b.indices) == 4 and b.pixels.shape[0] == 4 for b in batches)
        first_epoch = np.concatenate([b.indices for b in batches[:5]])
        np.testing.assert_array_equal(first_epoch, order[order != 6][:20])  # next sample fills in
        assert 6 not in np.concatenate([b.indices for b in batches])
        assert len(loader.bad_files) == 1  # counted once, though met in both epochs
        path, reason = loader.bad_files[0]
        assert path == str(samples[6].image) and "img6.png" in reason
        assert loader.state_dict()["bad_indices"] == [6]
        assert [len(b.indices) for b in loader.iter_epoch()] == [4] * 5


def test_too_many_bad_images_raise(tmp_path):
    samples = make_samples(tmp_path, 20, bad=(3, 11))
    with make_loader(samples, max_bad_fraction=0.05) as loader:  # 1 of 20 allowed
        with pytest.raises(DataError, match=r"2 of 20 images could not be read") as info:
            list(loader.iter_epoch())
    assert "img3.png" in str(info.value) and "img11.png" in str(info.value)
    with make_loader(samples, max_bad_fraction=0.1) as tolerant:  # 2 of 20 allowed
        assert sum(len(b.indices) for b in tolerant.iter_epoch()) == 18


def test_unusable_datasets_raise(tmp_path):
    with pytest.raises(DataError, match="no samples"):
        make_loader([])
    with pytest.raises(DataError, match="fewer than batch_size"):
        make_loader(make_samples(tmp_path, 3)).next_batch()
    with make_loader(make_samples(tmp_path, 5, bad=(0, 1)), max_bad_fraction=1.0) as loader:
        with pytest.raises(DataError, match="only 3 of 5 images decode"):
            loader.next_batch()
    mixed = make_samples(tmp_path, 4, labels=True)
    mixed[1] = Sample(mixed[1].image, "caption 1")
    with pytest.raises(DataError, match="no label"):
        make_loader(mixed)
    loader = make_loader(make_samples(tmp_path, 6))
    state = loader.state_dict()
    with pytest.raises(DataError, match="saved num_samples is 6"):
        make_loader(make_samples(tmp_path, 7)).load_state_dict(state)
