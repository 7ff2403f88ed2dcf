"""`mlxclip shard DATA OUT_DIR`: any dataset the toolkit reads, written as webdataset tar shards.

What img2dataset writes and `data.shards` reads back: `OUT_DIR/shard-000000.tar`, ..., each sample
the members `{key}.{ext}` (the image's bytes, unchanged), `{key}.txt` (the caption), `{key}.cls`
(the class index, for class data) and `{key}.json` (caption, source, label, class name), then
`manifest.json` with the sample count of each shard, so the reader counts nothing at start. The
key is the sample's row in DATA, zero-padded to 9 digits: a skipped image leaves a gap, as in
img2dataset, so a key always names the row it came from.

The same input gives byte-identical shards (fixed member headers, nothing timed or random). The
shards are written into `OUT_DIR.partial-<pid>` and renamed into place once the manifest is
there, so an interrupted run leaves no half-written OUT_DIR.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mlx_clip.data.sample import Sample
from mlx_clip.data.shards import IMAGE_EXTENSIONS, MANIFEST, MANIFEST_FORMAT
from mlx_clip.data.stream import ShardedTable, StoredImage
from mlx_clip.errors import ConfigError, DataError, ImageError, check_int
from mlx_clip.outputs import check_folder, move_into_place, refuse_overlap, staging_folder

SAMPLES_PER_SHARD = 10_000
MANIFEST_VERSION = 1
KEY_DIGITS = 9
SHARD_NAME = "shard-{:06d}.tar"
SHOWN_SKIPPED = 10  # skipped images the summary lists before pointing at the manifest
# PIL's names for the formats the reader takes by extension; any other (BMP in class folders, GIF
# or TIFF inside parquet) is re-encoded as PNG, lossless, or the reader would find no image member.
PIL_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"}
VAL_SPLITS = ("val", "validation")


def write_shards(data_path: str | Path, out_dir: str | Path, *, samples_per_shard: int = SAMPLES_PER_SHARD,
                 overwrite: bool = False, image_column: str | None = None, caption_column: str | None = None,
                 templates: list[str] | str | Path | None = None, split: str | None = None,
                 negative_column: str | None = None, echo: Callable[[str], object] = print) -> dict:
    """Write `data_path` (any layout `load_dataset` reads) as tar shards in `out_dir`; returns the
    manifest written. Unreadable images are skipped and listed, never fatal unless all are.
    `negative_column`: the hard-negative captions to carry, as each json member's "negatives"
    list (what `finetune --negative-column negatives` reads back)."""
    from mlx_clip.data.records import load_dataset

    check_int("--samples-per-shard", samples_per_shard, 1)
    out = Path(out_dir).expanduser()
    # Before the data is read: a refusal costs nothing, and --overwrite never reaches an input.
    refuse_overlap(out, {"DATA": data_path}, option="OUT_DIR")
    _check_destination(out, overwrite)
    dataset = load_dataset(data_path, templates=templates, image_column=image_column, caption_column=caption_column,
                           split=split, negative_column=negative_column)
    samples = _chosen_split(dataset, data_path, split)
    if isinstance(samples, ShardedTable):  # shards or parquet files named by a pattern or a list
        refuse_overlap(out, [("a file of DATA", shard.path) for shard in samples.shards], option="OUT_DIR")

    staging = staging_folder(out)
    try:
        manifest, image_folders = _write(samples, dataset.class_names, staging, samples_per_shard)
        # Images a captions file names may lie anywhere: replacing OUT_DIR must not remove them.
        refuse_overlap(out, [("the folder of an image of DATA", folder) for folder in sorted(image_folders)],
                       option="OUT_DIR", relations=("is", "contains"))
        move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _report(manifest, out, echo)
    return manifest


def _check_destination(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"OUT_DIR {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"OUT_DIR {out}: folder is not empty; pass --overwrite to replace it")
    check_folder(out.parent, option=f"OUT_DIR {out}: its folder")


def _chosen_split(dataset, data_path, split: str | None) -> Sequence[Sample]:
    """A folder with train/ and val/ gives its train split unless `split` names val; parquet
    applied `split` already, when choosing its files."""
    if dataset.val is None:
        if split is not None and not isinstance(dataset.samples, ShardedTable):
            raise ConfigError(f"--split {split}: {data_path} has no train/ and val/ folders to choose from")
        return dataset.samples
    if split is None or split.lower() == "train":
        return dataset.samples
    if split.lower() in VAL_SPLITS:
        return dataset.val
    raise ConfigError(f"--split must be train or val for {data_path}, got {split!r}")


def _write(samples: Sequence[Sample], class_names: list[str] | None, staging: Path,
           samples_per_shard: int) -> tuple[dict, set[str]]:
    shards: list[dict] = []
    skipped: list[list[str]] = []
    image_folders: set[str] = set()
    archive: tarfile.TarFile | None = None
    last_image, last_read = None, None  # rows of one image (several captions) follow each other
    try:
        for row, sample in enumerate(samples):
            source = sample.image.where if isinstance(sample.image, StoredImage) else str(sample.image)
            if last_image != source:
                last_image, last_read = source, _read_image(sample.image)
                if not isinstance(sample.image, StoredImage):
                    image_folders.add(os.path.dirname(source))
            if isinstance(last_read, str):
                skipped.append([source, last_read])
                continue
            if archive is None:
                shards.append({"file": SHARD_NAME.format(len(shards)), "samples": 0})
                archive = tarfile.open(staging / shards[-1]["file"], mode="w", format=tarfile.PAX_FORMAT)
            image, extension = last_read
            _add_sample(archive, row, image, extension, sample, source, class_names)
            shards[-1]["samples"] += 1
            if shards[-1]["samples"] == samples_per_shard:
                archive.close()
                archive = None
    finally:
        if archive is not None:
            archive.close()
    total = sum(shard["samples"] for shard in shards)
    if not total:
        raise DataError(f"none of the {len(skipped)} sample(s) has a readable image, e.g. "
                        f"{'; '.join(': '.join(s) for s in skipped[:3])}; nothing written")
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "shards": shards, "samples": total,
                "class_names": list(class_names) if class_names is not None else None, "skipped": skipped}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest, image_folders


def _read_image(image: Path | StoredImage) -> tuple[bytes, str] | str:
    """(bytes to store, extension), or why the image cannot be used."""
    try:
        data = image.read() if isinstance(image, StoredImage) else Path(image).read_bytes()
    except ImageError as err:  # a stored image's reader names its shard and key already
        return str(err).removeprefix(f"{image}: ")
    except OSError as err:
        return f"cannot read the file ({err.strerror or err})"
    try:
        with Image.open(io.BytesIO(data)) as probe:
            found = probe.format
            probe.verify()
    except UnidentifiedImageError:  # its message shows the buffer's address, which would vary run to run
        return "not a readable image (no format PIL knows)"
    except Exception as err:  # noqa: BLE001  PIL raises many kinds (SyntaxError, struct.error, ...) on bad bytes
        return f"not a readable image ({err.__class__.__name__}: {err})"
    if isinstance(image, StoredImage):
        extension = PIL_EXTENSIONS.get(found or "")
    else:
        extension = Path(image).suffix.lower().lstrip(".")
        extension = extension if extension in IMAGE_EXTENSIONS else None
    return (data, extension) if extension else (_as_png(data), "png")


def _as_png(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if image.mode not in PNG_MODES:
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def _add_sample(archive: tarfile.TarFile, row: int, image: bytes, extension: str, sample: Sample, source: str,
                class_names: list[str] | None) -> None:
    key = f"{row:0{KEY_DIGITS}d}"
    label = sample.label if class_names is not None else None
    record = {"caption": sample.caption, "source": source, "label": label,
              "class_name": class_names[label] if label is not None else None}
    if sample.negatives:
        record["negatives"] = list(sample.negatives)
    _add_member(archive, f"{key}.{extension}", image)
    _add_member(archive, f"{key}.txt", sample.caption.encode("utf-8"))
    if label is not None:
        _add_member(archive, f"{key}.cls", str(label).encode("ascii"))
    _add_member(archive, f"{key}.json", json.dumps(record, ensure_ascii=False).encode("utf-8"))


def _add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    # Every header field fixed, so the same input gives the same bytes whoever writes it, whenever.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    archive.addfile(info, io.BytesIO(data))


def _report(manifest: dict, out: Path, echo: Callable[[str], object]) -> None:
    skipped = manifest["skipped"]
    echo(f"wrote {manifest['samples']} samples in {len(manifest['shards'])} shard(s), skipped {len(skipped)}: {out}")
    for source, reason in skipped[:SHOWN_SKIPPED]:
        echo(f"  skipped {source}: {reason}")
    if len(skipped) > SHOWN_SKIPPED:
        echo(f"  and {len(skipped) - SHOWN_SKIPPED} more, all listed under \"skipped\" in {out / MANIFEST}")
