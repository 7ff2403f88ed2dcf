"""Small pictures of indexed images, for the web page's result grid: `/v1/thumbnails/{row}`.

A request names a row of the index, never a path. The file read is the index's image folder (as
`mlxclip index` recorded it) joined with that row's recorded relative path, and that path must be
relative and free of `..`: an edited `index.json` cannot reach outside the folder either. So the
server still reads no file a request names.

Each thumbnail is decoded with the server's own checks (its bytes must be a served format, its
pixel count within `--max-image-pixels`, read from the header), shrunk to `THUMBNAIL_SIDE` pixels
on its longer side and kept, encoded, in a small LRU cache: a result grid asks for the same dozen
images again on every search.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from pathlib import Path, PurePosixPath

from PIL import Image, ImageOps

from mlx_clip.serve.error_shapes import ApiError
from mlx_clip.serve.inputs import sniff_format

THUMBNAIL_SIDE = 256
CACHE_BYTES = 32 * 2 ** 20  # ~2,000 thumbnails of ~15 KB
JPEG_QUALITY = 85


class Thumbnails:
    def __init__(self, index, max_pixels: int):
        self.index, self.max_pixels = index, max_pixels
        folder = index.meta.get("image_dir")
        self.root = Path(folder) if folder else None
        self._cache: OrderedDict[int, tuple[bytes, str]] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()  # requests run in the CPU pool's threads

    def source(self, row: int) -> Path:
        """The file behind `row`: the image folder joined with the row's recorded relative path."""
        count = len(self.index)
        if not 0 <= row < count:
            raise ApiError(404, "not_found", f"row: {row} is not a row of the index (it holds {count} images, "
                           f"rows 0 to {count - 1})")
        if self.root is None:
            raise ApiError(404, "no_thumbnails", "this index does not record its image folder; rebuild it with "
                           "`mlxclip index` to see thumbnails")
        recorded = self.index.paths[row]
        relative = PurePosixPath(recorded)
        if not recorded or relative.is_absolute() or ".." in relative.parts:
            raise ApiError(403, "forbidden", f"row {row}: its recorded path {recorded!r} leaves the index's image "
                           "folder; the index was edited by hand — rebuild it with `mlxclip index`")
        return self.root.joinpath(*relative.parts)

    def get(self, row: int) -> tuple[bytes, str]:
        """(JPEG bytes, ETag) of `row`'s thumbnail."""
        with self._lock:
            if row in self._cache:
                self._cache.move_to_end(row)
                return self._cache[row]
        path = self.source(row)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ApiError(404, "image_missing", f"{self.index.paths[row]}: no longer in {self.root} (the index "
                           "was built before it moved or was deleted; rebuild it with `mlxclip index`)") from None
        except OSError as err:
            raise ApiError(404, "image_missing", f"{self.index.paths[row]}: unreadable ({err.strerror or err})") from None
        thumbnail = _shrink(data, self.index.paths[row], self.max_pixels)
        entry = (thumbnail, '"' + hashlib.sha256(data).hexdigest()[:32] + '"')
        with self._lock:
            if row not in self._cache:
                self._cache[row] = entry
                self._cached_bytes += len(thumbnail)
                while self._cached_bytes > CACHE_BYTES and len(self._cache) > 1:
                    _, (dropped, _) = self._cache.popitem(last=False)
                    self._cached_bytes -= len(dropped)
        return entry


def _shrink(data: bytes, name: str, max_pixels: int) -> bytes:
    fmt = sniff_format(data, name)
    try:
        img = Image.open(io.BytesIO(data), formats=[fmt])
        width, height = img.size
        if width * height > max_pixels:
            raise ApiError(413, "image_too_large", f"{name}: {width}x{height} = {width * height} pixels exceeds "
                           f"the limit of {max_pixels}")
        # JPEG decodes straight to 1/2..1/8 scale: a 12-megapixel photo's thumbnail costs a fraction of its decode.
        img.draft("RGB", (THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        img = ImageOps.exif_transpose(img).convert("RGB")
        img.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    except ApiError:
        raise
    except Image.DecompressionBombError as err:
        raise ApiError(413, "image_too_large", f"{name}: {err}") from None
    except Exception as err:  # a truncated or corrupt file: Pillow raises many types
        raise ApiError(422, "invalid_image", f"{name}: cannot be decoded ({type(err).__name__})") from None
    out = io.BytesIO()
    img.save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue()
