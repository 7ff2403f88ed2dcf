"""Image files -> normalized float32 pixels (H, W, 3), exactly as `transformers.CLIPImageProcessor`.

Three steps, each matched to a reference we did not write:
- decoding (`open_image`): `transformers.image_utils.load_image` (EXIF orientation, then RGB) and
  `transformers.image_transforms.convert_to_rgb` (transparency composited onto white), plus what
  neither does: a pixel-count check before decoding, 16-bit grayscale scaled rather than clipped,
  and every failure reported as one `ImageError` line.
- evaluation transform (`preprocess`): the CLIP processor's PIL path (`image_processing_backends.
  PilBackend`): shortest side -> `image_size` with PIL bicubic, center crop, x/255, (x-mean)/std;
  for SigLIP (`crop=False`), `SiglipImageProcessor`'s: a square bicubic resize, then the same.
- training augmentation (`random_resized_crop`): torchvision's `RandomResizedCrop.get_params`,
  driven by a numpy Generator so a run can be reproduced and resumed.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mlx_clip.errors import ConfigError, ImageError, check_int

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)  # transformers' IMAGENET_STANDARD_MEAN, as google/siglip-* use
SIGLIP_STD = (0.5, 0.5, 0.5)

# Pillow's own decompression-bomb warning threshold: far above any photo CLIP trains on, far below
# what a crafted header can claim (a 1 KB PNG can announce 4 billion pixels).
DEFAULT_MAX_PIXELS = 89_478_485

ImageSource = str | Path | bytes | bytearray | memoryview | Image.Image

# Modes holding 16-bit samples (mode "I" is what older Pillow gives 16-bit PNGs).
_WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def open_image(source: ImageSource, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a file, bytes or PIL image into a fully loaded RGB image.

    Raises `ImageError` (one line: the file and the problem) for a missing, truncated, corrupt,
    non-image or oversized file. `max_pixels=None` leaves only Pillow's own bomb limit.
    """
    name = _source_name(source)
    try:
        if isinstance(source, Image.Image):
            _check_pixels(source.size, max_pixels, name)
            source.load()
            return to_rgb(ImageOps.exif_transpose(source))
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
        # Image.open reads only the header, so an oversized image is refused before any decoding.
        with Image.open(fp) as img:
            _check_pixels(img.size, max_pixels, name)
            img.load()  # decode now, so a truncated file fails here rather than mid-batch
            return to_rgb(ImageOps.exif_transpose(img))
    except ImageError:
        raise
    except Exception as err:  # Pillow raises many types on corrupt data; all mean "bad file"
        raise ImageError(f"cannot read image {name}: {_reason(err)}") from None


# EXIF orientations 5-8 rotate by 90 degrees: `exif_transpose` swaps width and height.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112


def image_size_of(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of the image `open_image` would give, read from the header alone (no
    decoding): EXIF rotation applied. `ImageError` (one line) for a file Pillow cannot identify."""
    name = _source_name(path)
    try:
        with Image.open(path) as img:
            _check_pixels(img.size, max_pixels, name)
            width, height = img.size
            if img.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSING_ORIENTATIONS:
                width, height = height, width
            return width, height
    except ImageError:
        raise
    except Exception as err:
        raise ImageError(f"cannot read image {name}: {_reason(err)}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB the way `CLIPImageProcessor` does, 16-bit gray excepted.

    Transparency (RGBA, LA, PA, a palette or tRNS transparent colour) is composited onto white, as
    `transformers.image_transforms.convert_to_rgb` does; every other mode goes through
    `Image.convert("RGB")`. 16-bit grayscale is scaled (v * 255 / 65535, rounded) where Pillow's
    convert would clip everything above 255 to white. Float ("F") images keep Pillow's clipping.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_GRAY_MODES:
        wide = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        gray = ((wide * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def resize_shortest_side(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so the shorter side is `size`, keeping the aspect ratio.

    The long side is `int(size * long / short)` (truncated), the rounding of transformers'
    `get_resize_output_image_size(default_to_square=False)`.
    """
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    return image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)


def center_crop(pixels: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """(H, W, C) -> (size, size, C) or (height, width, C); offsets floor((H - height) / 2), as
    transformers' center_crop."""
    crop_h, crop_w = (size, size) if isinstance(size, int) else size
    height, width = pixels.shape[:2]
    if height < crop_h or width < crop_w:
        raise ConfigError(
            f"center_crop needs an image of at least {crop_w}x{crop_h}, got {width}x{height}"
        )
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return pixels[top : top + crop_h, left : left + crop_w]


def normalize(
    pixels: np.ndarray,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
) -> np.ndarray:
    """uint8 (..., 3) -> float32 (x / 255 - mean) / std.

    The arithmetic order and dtypes are transformers' (`rescale` in float64 then cast to float32,
    `normalize` in float32), so outputs match its PIL path bit for bit.
    """
    scaled = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def resize_square(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize to size x size whatever the aspect ratio: SigLIP's transform
    (`SiglipImageProcessor`, `size={"height": s, "width": s}`, no crop)."""
    return image.resize((size, size), resample=Image.Resampling.BICUBIC)


def preprocess(
    image: Image.Image,
    image_size: int | tuple[int, int],
    *,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
    crop: bool = True,
) -> np.ndarray:
    """The evaluation transform: PIL image -> float32 (height, width, 3). With `crop` (CLIP),
    shortest side to `image_size` then center crop; without (SigLIP), a square resize.

    A (height, width) size (an aspect-ratio bucket) is the same transform at that shape: with
    `crop`, the shortest side resized just enough to cover both sides, then a center crop (what
    `CLIPImageProcessor` does with that `shortest_edge` and `crop_size`); without, a resize to
    exactly that shape (`SiglipImageProcessor` with `size={"height", "width"}`)."""
    height, width = _size_pair(image_size)
    rgb = to_rgb(image)
    if not crop:
        resized = rgb.resize((width, height), resample=Image.Resampling.BICUBIC)
        return normalize(np.asarray(resized), mean, std)
    resized = resize_shortest_side(rgb, _covering_shortest_side(rgb.width, rgb.height, height, width))
    return normalize(center_crop(np.asarray(resized), (height, width)), mean, std)


def _covering_shortest_side(width: int, height: int, target_height: int, target_width: int) -> int:
    """The smallest shortest side after which a `resize_shortest_side` image covers the target:
    the short side's own target, raised until the truncated long side reaches its target."""
    if target_height == target_width:
        return target_height  # CLIP's square case, exactly as before
    portrait = width <= height
    short, long = (width, height) if portrait else (height, width)
    short_target, long_target = (target_width, target_height) if portrait else (target_height, target_width)
    size = max(short_target, math.ceil(long_target * short / long))
    while int(size * long / short) < long_target:  # float truncation can land one short
        size += 1
    return size


def _size_pair(image_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(image_size, tuple):
        if len(image_size) != 2:
            raise ConfigError(f"image_size must be an integer or (height, width), got {image_size!r}")
        for side in image_size:
            _check_size(side)
        return image_size
    _check_size(image_size)
    return image_size, image_size


def preprocess_batch(
    images: Sequence[Image.Image],
    image_size: int,
    *,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
    crop: bool = True,
) -> np.ndarray:
    """`preprocess` over a list -> float32 (N, image_size, image_size, 3)."""
    if len(images) == 0:
        return np.zeros((0, image_size, image_size, 3), np.float32)
    return np.stack([preprocess(im, image_size, mean=mean, std=std, crop=crop) for im in images])


def random_resized_crop_params(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width), torchvision `RandomResizedCrop.get_params`' algorithm.

    Ten tries at a crop of random area share `scale` and log-uniform aspect `ratio`; if none fits,
    the largest centered crop whose aspect is clamped into `ratio`.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    image: Image.Image,
    image_size: int | tuple[int, int],
    rng: np.random.Generator,
    *,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: bool = False,
) -> Image.Image:
    """Seeded training crop -> RGB image of image_size x image_size (bicubic, as open_clip trains).

    The default scale (0.9, 1.0) is open_clip's fine-tuning default: light enough that captions
    still describe the crop. Flipping is off by default because captions can name left and right.
    For a (height, width) target (an aspect-ratio bucket) the crop's aspect range is centred on
    the target's, so the crop is resized to it without stretching beyond what `ratio` allows.
    """
    height, width = _size_pair(image_size)
    _check_range("scale", scale, upper=1.0)
    _check_range("ratio", ratio, upper=None)
    rgb = to_rgb(image)
    target_aspect = width / height
    ratio = (ratio[0] * target_aspect, ratio[1] * target_aspect)
    top, left, h, w = random_resized_crop_params(rgb.width, rgb.height, rng, scale, ratio)
    crop = rgb.crop((left, top, left + w, top + h))
    out = crop.resize((width, height), resample=Image.Resampling.BICUBIC)
    if hflip and rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def _check_pixels(size: tuple[int, int], max_pixels: int | None, name: str) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f"cannot read image {name}: {width}x{height} = {width * height} pixels exceeds "
            f"max_pixels {max_pixels}"
        )


def _check_size(image_size: int) -> None:
    check_int("image_size", image_size, minimum=1)


def _check_range(name: str, bounds: tuple[float, float], upper: float | None) -> None:
    lo, hi = bounds
    if not (0 < lo <= hi) or (upper is not None and hi > upper):
        limit = f" and at most {upper}" if upper is not None else ""
        raise ConfigError(f"{name} must be (low, high) with 0 < low <= high{limit}, got {bounds}")


def _source_name(source: ImageSource) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or "<PIL image>"
    return "<bytes>"


def _reason(err: Exception) -> str:
    if isinstance(err, FileNotFoundError):
        return "file not found"
    if isinstance(err, IsADirectoryError):
        return "is a directory"
    if isinstance(err, UnidentifiedImageError):
        return "not an image format Pillow can decode"
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
