"""Image decoding and the CLIP transform, held to transformers' CLIPImageProcessor and torchvision.

transformers 5 ships two CLIP processors: `CLIPImageProcessorPil` (PIL resize, what the original
CLIP preprocessing did) and `CLIPImageProcessor` (torchvision tensors). Ours uses PIL, so it must
equal the first exactly. Against the second, bicubic rounding differs on rare pixels by one or two
8-bit levels, i.e. 1/(255*std) ~ 0.015 per level after normalization; measured on noise images
(the worst case): max 0.030, mean <= 1.4e-4.
"""

import mlx_clip  # noqa: F401  (first, before anything imports mlx)

import io
import zlib

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from transformers import CLIPImageProcessor
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, load_image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from mlx_clip.errors import ImageError
from mlx_clip.model.image_processing import (
    OPENAI_MEAN,
    OPENAI_STD,
    open_image,
    preprocess,
    preprocess_batch,
    random_resized_crop,
    random_resized_crop_params,
)

LEVEL = 1 / (255 * min(OPENAI_STD))  # one 8-bit step after normalization


def _processors(size: int):
    kwargs = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return CLIPImageProcessorPil(**kwargs), CLIPImageProcessor(**kwargs)


def _reference(processor, image: Image.Image) -> np.ndarray:
    out = processor(images=image, return_tensors="np")["pixel_values"][0]
    return out.transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)


def _noise(height: int, width: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _check_against_transformers(ours: np.ndarray, image: Image.Image, size: int) -> None:
    pil_proc, tv_proc = _processors(size)
    assert ours.shape == (size, size, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, _reference(pil_proc, image), rtol=0, atol=1e-6)
    diff = np.abs(ours - _reference(tv_proc, image))
    assert diff.max() <= 2 * LEVEL + 1e-5
    assert diff.mean() <= 1e-3


@pytest.mark.parametrize(
    "width,height,size",
    [(7, 300, 16), (300, 7, 32), (64, 64, 32), (33, 47, 16), (47, 33, 32), (31, 31, 32),
     (500, 375, 224), (32, 32, 32), (33, 32, 32), (5, 5, 16)],
)
def test_preprocess_matches_clip_image_processor(width, height, size):
    image = Image.fromarray(_noise(height, width, seed=width * 1000 + height))
    _check_against_transformers(preprocess(image, size), image, size)


def _write(tmp_path, name: str, image: Image.Image, **save_kwargs):
    path = tmp_path / name
    image.save(path, **save_kwargs)
    return path


def test_modes_decode_like_clip_image_processor(tmp_path):
    """Files in every common mode: decoded by us vs. transformers converting the opened file."""
    rgb = _noise(37, 29, seed=1)
    alpha = _noise(37, 29, seed=2, channels=1)
    palette = Image.fromarray(rgb).quantize(colors=16)
    palette_t = palette.copy()
    palette_t.info["transparency"] = 3
    files = [
        _write(tmp_path, "gray.png", Image.fromarray(rgb[..., 0], mode="L")),
        _write(tmp_path, "la.png", Image.fromarray(np.dstack([rgb[..., 0], alpha]), mode="LA")),
        _write(tmp_path, "rgba.png", Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA")),
        _write(tmp_path, "p.png", palette),
        _write(tmp_path, "p_t.png", palette_t, transparency=3),
        _write(tmp_path, "rgb.jpg", Image.fromarray(rgb), quality=90),
        _write(tmp_path, "cmyk.jpg", Image.fromarray(rgb).convert("CMYK")),
        _write(tmp_path, "gray.webp", Image.fromarray(rgb[..., 1], mode="L")),
    ]
    for path in files:
        ours = open_image(path)
        assert ours.mode == "RGB"
        with Image.open(path) as reference:
            _check_against_transformers(preprocess(ours, 16), reference, 16)
    # Transparency really was composited onto white: a fully transparent pixel reads as 255.
    clear = np.dstack([rgb, np.zeros_like(alpha)])
    path = _write(tmp_path, "clear.png", Image.fromarray(clear, mode="RGBA"))
    assert np.all(np.asarray(open_image(path)) == 255)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    wide = np.random.default_rng(3).integers(0, 65536, (23, 41), dtype=np.uint16)
    wide[0, :3] = [0, 65535, 257 * 100]
    path = _write(tmp_path, "deep.png", Image.fromarray(wide))
    with Image.open(path) as raw:
        assert raw.mode.startswith("I;16")
    ours = np.asarray(open_image(path))
    expected = np.round(wide.astype(np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(ours, np.repeat(expected[..., None], 3, axis=-1))
    assert ours[0, :3, 0].tolist() == [0, 255, 100]
    # the transform then agrees with transformers fed the correctly scaled 8-bit image
    _check_against_transformers(preprocess(open_image(path), 16), Image.fromarray(expected), 16)


def test_exif_orientation_applied(tmp_path):
    # 8x8 blocks survive JPEG almost exactly, so the decoded file can be compared to its source.
    blocks = np.random.default_rng(4).integers(0, 256, (3, 5, 3), dtype=np.uint8)
    source = np.kron(blocks, np.ones((8, 8, 1), np.uint8))  # (24, 40, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    jpeg = dict(exif=exif, quality=95, subsampling=0)  # 4:4:4 so colours do not bleed
    path = _write(tmp_path, "rotated.jpg", Image.fromarray(source), **jpeg)
    ours = np.asarray(open_image(path))
    assert ours.shape == (40, 24, 3)
    np.testing.assert_array_equal(ours, np.asarray(load_image(str(path))))
    with Image.open(path) as raw:
        np.testing.assert_array_equal(ours, np.asarray(raw.transpose(Image.Transpose.ROTATE_270)))
    clockwise = np.rot90(source, k=-1)
    assert np.abs(ours.astype(int) - clockwise).mean() < 1.5  # JPEG loss only
    assert np.abs(ours.astype(int) - np.rot90(source, k=1)).mean() > 30  # not the other way


def test_bytes_and_pil_inputs(tmp_path):
    image = Image.fromarray(_noise(20, 30, seed=5))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    np.testing.assert_array_equal(np.asarray(open_image(buf.getvalue())), np.asarray(image))
    rgba = Image.fromarray(np.dstack([_noise(20, 30, 6), _noise(20, 30, 7, 1)]), mode="RGBA")
    reference = convert_to_rgb(rgba, return_numpy=True)  # transformers: composite onto white
    np.testing.assert_array_equal(np.asarray(open_image(rgba)), reference)
    batch = preprocess_batch([image, rgba], 16)
    assert batch.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(batch[1], preprocess(open_image(rgba), 16))


def _assert_image_error(path, match: str, **kwargs):
    with pytest.raises(ImageError) as info:
        open_image(path, **kwargs)
    message = str(info.value)
    assert str(path) in message and match in message, message
    assert "\n" not in message and "Traceback" not in message


def test_bad_files_raise_one_line_image_error(tmp_path):
    good = io.BytesIO()
    Image.fromarray(_noise(64, 64, seed=8)).save(good, format="JPEG")
    jpeg = good.getvalue()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(jpeg[: len(jpeg) // 2])
    _assert_image_error(truncated, "truncated")

    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    _assert_image_error(text, "not an image")

    png = io.BytesIO()
    Image.fromarray(_noise(32, 32, seed=9)).save(png, format="PNG")
    data = bytearray(png.getvalue())
    start = data.index(b"IDAT") + 8
    data[start : start + 40] = bytes(40)  # zero out compressed pixel data
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(bytes(data))
    _assert_image_error(corrupt, "cannot read image")

    _assert_image_error(tmp_path / "missing.jpg", "file not found")


def test_oversized_refused_from_header_before_decoding(tmp_path):
    big = _write(tmp_path, "big.png", Image.fromarray(_noise(60, 50, seed=10)))
    _assert_image_error(big, "3000 pixels exceeds max_pixels 2999", max_pixels=2999)
    assert open_image(big, max_pixels=3000).size == (50, 60)
    # A header claiming 5000x5000 pixels with 10 bytes of data behind it: refused for its size,
    # not for its missing data, so nothing was decoded.
    ihdr = bytearray(big.read_bytes()[:33])  # PNG signature + IHDR chunk
    ihdr[16:24] = (5000).to_bytes(4, "big") * 2
    ihdr[29:33] = zlib.crc32(bytes(ihdr[12:29])).to_bytes(4, "big")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bytes(ihdr) + (4096).to_bytes(4, "big") + b"IDAT" + bytes(10))
    _assert_image_error(bomb, "25000000 pixels exceeds max_pixels 1000000", max_pixels=1_000_000)
    _assert_image_error(bomb, "OSError", max_pixels=None)  # the same file, decoded: no data


def test_random_resized_crop_is_seeded():
    image = Image.fromarray(_noise(40, 56, seed=11))

    def crop(seed, **kw):
        return np.asarray(random_resized_crop(image, 16, np.random.default_rng(seed), **kw))

    np.testing.assert_array_equal(crop(0), crop(0))
    assert not np.array_equal(crop(0), crop(1))
    wide = dict(scale=(0.08, 1.0))
    np.testing.assert_array_equal(crop(5, **wide), crop(5, **wide))
    assert not np.array_equal(crop(5, **wide), crop(6, **wide))
    # flipping draws after the crop, so a flipped output is the unflipped crop mirrored
    flips = 0
    for seed in range(8):
        plain, flipped = crop(seed), crop(seed, hflip=True)
        flips += not np.array_equal(plain, flipped)
        assert np.array_equal(plain, flipped) or np.array_equal(plain[:, ::-1], flipped)
    assert 0 < flips < 8


def test_random_resized_crop_follows_torchvision():
    image = Image.fromarray(_noise(40, 56, seed=12))
    for seed in range(20):
        rng = np.random.default_rng(seed)
        top, left, h, w = random_resized_crop_params(56, 40, rng, scale=(0.08, 1.0))
        assert 0 <= top <= 40 - h and 0 <= left <= 56 - w
        assert h * w >= 0.08 * 2240 - (h + w)  # area share >= scale[0], up to rounding of h, w
        assert 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1  # aspect within ratio, up to rounding
        ours = random_resized_crop(image, 16, np.random.default_rng(seed), scale=(0.08, 1.0))
        reference = TF.resized_crop(
            image, top, left, h, w, [16, 16], interpolation=T.InterpolationMode.BICUBIC
        )
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference))
    # The fallback (no random crop fits in 10 tries) involves no randomness: torchvision's own
    # get_params must give the same box.
    torch.manual_seed(0)
    for scale, ratio in [((1.0, 1.0), (2.0, 2.0)), ((1.0, 1.0), (0.25, 0.25))]:
        expected = T.RandomResizedCrop.get_params(image, list(scale), list(ratio))
        got = random_resized_crop_params(56, 40, np.random.default_rng(0), scale, ratio)
        assert got == tuple(expected)


def test_normalization_constants_are_openai_clip():
    assert OPENAI_MEAN == tuple(OPENAI_CLIP_MEAN) and OPENAI_STD == tuple(OPENAI_CLIP_STD)
