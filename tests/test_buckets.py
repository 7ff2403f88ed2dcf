"""--buckets: aspect-ratio buckets for data of mixed shapes.

The transforms at a (height, width) are held to transformers' image processors at that shape, the
MLX vision tower on a non-square grid to transformers' `interpolate_pos_encoding`; the loader's
batches are one shape each, every sample in the bucket nearest its aspect ratio, an epoch visits
each sample at most once, and a restored loader or a resumed run continues exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mlx_clip.data.buckets import Bucket, grid_buckets, nearest_bucket
from mlx_clip.data.loader import BatchLoader
from mlx_clip.data.sample import Sample
from mlx_clip.errors import DataError
from mlx_clip.model.image_processing import image_size_of, preprocess, random_resized_crop
from mlx_clip.training.trainer import Interrupted
from tests.train_helpers import assert_same_weights, final_weights, run, small_config

# (width, height) of the mixed-aspect images: landscape, portrait, square, panorama, tall.
SHAPES = [(96, 48), (40, 72), (56, 56), (120, 40), (36, 90), (80, 60)]


def _image(rng: np.random.Generator, width: int, height: int, colour) -> Image.Image:
    """A coloured field with a brighter block at a random place: structure for the crops to move."""
    pixels = np.clip(np.asarray(colour) + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
    top, left = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
    pixels[top:top + height // 3, left:left + width // 3] = 255
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """A class-folder dataset (train/ and val/) whose images have six aspect ratios."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 12), ("val", 3)):
        for name, colour in (("red", (200, 40, 40)), ("blue", (40, 60, 210)), ("green", (40, 170, 60))):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                width, height = SHAPES[i % len(SHAPES)]
                _image(rng, width, height, colour).save(folder / f"{i:03d}.png")
    return root


def _samples(root) -> list[Sample]:
    paths = sorted((root / "train").rglob("*.png"))
    return [Sample(image=p, caption=f"a photo of {p.parent.name}", image_id=i) for i, p in enumerate(paths)]


def _tokenize(texts):
    return np.zeros((len(texts), 8), np.int64)


def _loader(samples, **kw) -> BatchLoader:
    options = dict(batch_size=4, image_size=32, tokenize=_tokenize, seed=3, augment=True, buckets=True,
                   patch_size=8, num_workers=2)
    return BatchLoader(samples, **{**options, **kw})


def test_buckets_are_the_largest_grids_up_to_two_to_one():
    for grid in (4, 7, 14):
        buckets = grid_buckets(grid)
        assert Bucket(grid, grid) in buckets
        for b in buckets:
            assert b.rows * b.cols <= grid * grid  # never more patches (time, memory) than the square
            assert 0.5 <= b.aspect <= 2.0
            assert (b.cols + 1) * b.rows > grid * grid  # the widest grid for its row count
    assert grid_buckets(7) == [Bucket(9, 5), Bucket(8, 6), Bucket(7, 7), Bucket(6, 8), Bucket(5, 9)]
    # log-ratio distance: 2:1 goes to the widest bucket, 1:2 to the tallest, near-square to square
    sevens = grid_buckets(7)
    assert [sevens[nearest_bucket(w, h, sevens)] for w, h in ((200, 100), (100, 200), (101, 100))] == [
        Bucket(5, 9), Bucket(9, 5), Bucket(7, 7)]
    # a resolution schedule rescales a bucket's grid, never past the square's patch count
    assert Bucket(3, 5).shape(32, 8, 4) == (24, 40)
    assert Bucket(3, 5).shape(64, 8, 4) == (48, 80)
    h, w = Bucket(5, 9).shape(160, 32, 7)
    assert (h // 32) * (w // 32) <= 25


@pytest.mark.parametrize("size", [(48, 80), (80, 48), (40, 40)])
def test_rectangular_transforms_equal_transformers(size):
    """SigLIP's square-less resize equals SiglipImageProcessor with size {height, width}; CLIP's
    cover-and-crop equals CLIPImageProcessor with that shortest_edge and crop_size (PIL, bit-exact
    up to float32 normalisation), and the shortest edge is the smallest that covers the shape."""
    # transformers 5's PIL processors (the default ones resize with torchvision, off by 1/255 here)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as CLIPImageProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil as SiglipImageProcessor

    height, width = size
    rng = np.random.default_rng(1)
    for w, h in ((97, 61), (50, 130), (64, 64)):
        image = _image(rng, w, h, (120, 90, 60))
        siglip = SiglipImageProcessor(size={"height": height, "width": width})
        theirs = siglip(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        np.testing.assert_allclose(preprocess(image, size, mean=(0.5,) * 3, std=(0.5,) * 3, crop=False), theirs,
                                   atol=1e-6)
        ours = preprocess(image, size)
        from mlx_clip.model.image_processing import _covering_shortest_side

        edge = _covering_shortest_side(w, h, height, width)
        clip = CLIPImageProcessor(size={"shortest_edge": edge}, crop_size={"height": height, "width": width})
        theirs = clip(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        assert ours.shape == (height, width, 3)
        np.testing.assert_allclose(ours, theirs, atol=1e-6)
        short, long = min(w, h), max(w, h)
        smaller = edge - 1
        covers = (lambda s: (s, int(s * long / short)) if w <= h else (int(s * long / short), s))
        assert covers(edge)[0] >= width and covers(edge)[1] >= height
        if height != width:
            assert covers(smaller)[0] < width or covers(smaller)[1] < height


def test_augmented_crop_has_the_bucket_shape_and_aspect():
    rng = np.random.default_rng(0)
    image = _image(rng, 200, 100, (10, 200, 30))
    for seed in range(5):
        out = random_resized_crop(image, (40, 72), np.random.default_rng(seed))
        assert out.size == (72, 40)
    square = random_resized_crop(image, 32, np.random.default_rng(7))
    assert square.size == (32, 32)


def test_header_size_applies_exif_rotation(tmp_path):
    image = Image.new("RGB", (60, 20), (1, 2, 3))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: open_image (exif_transpose) gives a 20x60 image
    image.save(tmp_path / "r.jpg", exif=exif)
    assert image_size_of(tmp_path / "r.jpg") == (20, 60)
    from mlx_clip.model.image_processing import open_image

    assert open_image(tmp_path / "r.jpg").size == (20, 60)


def test_batches_share_a_shape_and_an_epoch_visits_each_sample_once(mixed_folder):
    samples = _samples(mixed_folder)
    with _loader(samples) as loader:
        assignment = loader._assignment()
        for index, sample in enumerate(samples):
            width, height = Image.open(sample.image).size
            assert assignment[index] == nearest_bucket(width, height, loader.buckets)
        counts = dict(loader.bucket_counts())
        assert len(loader) == sum(n // 4 for n in counts.values())
        shapes = {loader.bucket_shape(b) for b in range(len(loader.buckets))}
        seen = []
        batches = list(loader)  # one epoch
        assert len(batches) == len(loader)
        for batch in batches:
            assert batch.pixels.shape[1:3] in shapes
            assert {int(assignment[i]) for i in batch.indices} == {
                b for b in range(len(loader.buckets)) if loader.bucket_shape(b) == batch.pixels.shape[1:3]}
            seen += batch.indices.tolist()
        assert len(seen) == len(set(seen))  # no sample twice in an epoch
        # what an epoch leaves out is fewer than one batch per bucket
        left_out = [int(b) for b in assignment[sorted(set(range(len(samples))) - set(seen))]]
        assert all(left_out.count(b) < 4 for b in set(left_out))
        assert len({batch.pixels.shape[1:3] for batch in batches}) > 1  # mixed data: several shapes


def test_restored_loader_continues_exactly_and_refuses_other_settings(mixed_folder):
    samples = _samples(mixed_folder)
    with _loader(samples) as original:
        for _ in range(5):  # into the second epoch (len is 7 here)
            original.next_batch()
        state = json.loads(json.dumps(original.state_dict()))
        expected = [original.next_batch() for _ in range(6)]
    with _loader(samples) as restored:
        restored.load_state_dict(state)
        for want in expected:
            got = restored.next_batch()
            assert got.indices.tolist() == want.indices.tolist()
            assert got.pixels.tobytes() == want.pixels.tobytes()
    with _loader(samples, buckets=False) as square, pytest.raises(DataError, match="--buckets"):
        square.load_state_dict(state)


def test_an_unreadable_image_is_counted_and_replaced_from_its_bucket(mixed_folder, tmp_path):
    samples = _samples(mixed_folder)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    samples = samples[:-1] + [Sample(image=broken, caption="a photo of red", image_id=len(samples) - 1)]
    with _loader(samples, max_bad_fraction=0.1) as loader:
        batches = list(loader)
        assert loader.bad_files == [(str(broken), loader.bad_files[0][1])]
        assert "broken.png" in loader.bad_files[0][1]
        assert all(len(b.indices) == 4 for b in batches)
        assert len(samples) - 1 not in {i for b in batches for i in b.indices.tolist()}


@pytest.mark.parametrize("engine", ["mlx", "torch"])
@pytest.mark.parametrize("family", ["tiny", "siglip-tiny"])
def test_towers_on_a_rectangular_grid_equal_transformers(family, engine):
    """Both engines' image embeddings at a 3x5 patch grid (a bucket of a 4x4 model) against
    transformers' interpolate_pos_encoding on the same weights, float32, L2-normalised: measured max
    |difference| 9.7e-8 (MLX) and 1.4e-8 (torch), the bound 1e-6."""
    import torch
    from transformers import AutoModel

    from mlx_clip.api import load
    from mlx_clip.model.builtin import materialize

    folder = materialize(family)
    clip = load(folder, engine)
    vision = clip.config.vision_config
    # The 3x5 bucket of a 4x4 grid, at this model's size: tiny's own grid is 4x4 (3x5 patches of 8 px),
    # siglip-tiny's 8x8 (the bucket scaled to 6x10 patches of 8 px).
    height, width = Bucket(3, 5).shape(vision.image_size, vision.patch_size, 4)
    assert (height, width) == ((24, 40) if family == "tiny" else (48, 80))
    pixels = np.random.default_rng(2).normal(size=(2, height, width, 3)).astype(np.float32)
    model = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        theirs = model.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)),
                                          interpolate_pos_encoding=True)
    theirs = getattr(theirs, "pooler_output", theirs).numpy().astype(np.float64)
    ours = np.asarray(clip.engine.encode_images(pixels), np.float64)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(unit(ours), unit(theirs), rtol=0, atol=1e-6)


def _mixed_run(tmp_path, mixed_folder, engine, **kw):
    options = dict(data=str(mixed_folder), buckets=True, batch_size=4, steps=6, save_every=2)
    return small_config(tmp_path, engine, **{**options, **kw})


@pytest.mark.parametrize("engine", ["mlx", "torch"])
def test_training_with_buckets_resumes_exactly(tmp_path, mixed_folder, engine):
    whole = run(_mixed_run(tmp_path / "whole", mixed_folder, engine))
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert len({tuple(r["image_shape"]) for r in records if "loss" in r}) > 1  # steps of several shapes
    out = tmp_path / "cut"
    with pytest.raises(Interrupted):
        run(_mixed_run(out, mixed_folder, engine), stop_after=3)
    resumed = run(_mixed_run(out, mixed_folder, engine, resume="latest"))
    assert resumed.train.losses == whole.train.losses[3:]  # the interruption left a step-3 checkpoint
    assert_same_weights(final_weights(tmp_path / "whole"), final_weights(out))


def test_engines_agree_on_bucketed_steps(tmp_path, mixed_folder):
    """Both engines see the same bucketed batches and interpolate positions alike. Measured relative
    loss differences: step 1 0, the six steps at most 8.3e-7 (updates compound rounding); bounds 1e-6
    (a few float32 roundings) and 1e-5 (about 10x)."""
    mlx = run(_mixed_run(tmp_path / "m", mixed_folder, "mlx", save_every=0))
    torch = run(_mixed_run(tmp_path / "t", mixed_folder, "torch", save_every=0))
    np.testing.assert_allclose(mlx.train.losses[0], torch.train.losses[0], rtol=1e-6)
    np.testing.assert_allclose(mlx.train.losses, torch.train.losses, rtol=1e-5)


def test_resume_with_another_bucket_setting_is_refused(tmp_path, mixed_folder):
    from mlx_clip.errors import CheckpointError

    out = tmp_path / "r"
    with pytest.raises(Interrupted):
        run(_mixed_run(out, mixed_folder, "mlx"), stop_after=2)
    with pytest.raises(CheckpointError, match="buckets: checkpoint True, now False"):
        run(small_config(out, "mlx", data=str(mixed_folder), batch_size=4, steps=6, save_every=2,
                         resume="latest"))
