"""Webdataset tar shards (what img2dataset writes and open_clip trains on), read in place.

`--data` names the shards as open_clip's `--train-data` does: a brace pattern
(`shards/{00000..00099}.tar`), a folder of `.tar` files, a single `.tar`, or a text file listing one
shard per line. A sample is the run of members sharing a key (`000123.jpg` + `000123.txt`): the
image is its `jpg`/`jpeg`/`png`/`webp` member (or the extension `--image-column` names), the
caption its `txt` member or the `--caption-column` field (default `caption`) of its `json`, the
class its `cls` member when the shards carry class names.

Sample counts come from the manifest `mlxclip shard` writes (`manifest.json`), from img2dataset's
`*_stats.json`, or else from one scan of the tar headers at start. Shards are read with the
standard library's `tarfile`, which gives each member's offset: a shard is indexed when first used
and its samples are then read by offset in the seeded in-shard order, which is what makes the
order a pure function of the seed and a resume exact without replaying the shard. (The
`webdataset` package streams members in file order with a shuffle buffer instead.)
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from pathlib import Path

from braceexpand import braceexpand

from mlx_clip.data.captions import cell_negatives
from mlx_clip.data.stream import Shard, ShardedTable, ShardIndex
from mlx_clip.errors import DataError, ImageError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "mlxclip-shards"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# webdataset's rule: the key is the path up to the first dot of the file name, the rest the extension.
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def is_shard_spec(text: str) -> bool:
    """Whether `--data` names tar shards rather than a captions file or class folders."""
    path = Path(text).expanduser()
    if "{" in text and ".." in text:
        return True
    if path.is_file():
        return path.suffix.lower() == ".tar" or (path.suffix.lower() in (".txt", ".shards") and _lists_tars(path))
    if path.is_dir():
        return (path / MANIFEST).is_file() or (any(path.glob("*.tar")) and not _has_other_layout(path))
    return False


def _lists_tars(path: Path) -> bool:
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError):
        return False
    return bool(lines) and all(line.lower().endswith(".tar") for line in lines)


def _has_other_layout(path: Path) -> bool:
    return any(p.suffix.lower() in (".csv", ".tsv", ".jsonl", ".parquet") for p in path.iterdir() if p.is_file())


def shard_paths(spec: str) -> tuple[list[Path], Path]:
    """The shard files `spec` names, in order, and the folder their names are relative to."""
    path = Path(spec).expanduser()
    if path.is_dir():
        paths, root = sorted(path.glob("*.tar")), path
    elif path.is_file() and path.suffix.lower() != ".tar":
        listed = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        paths, root = [(path.parent / p).expanduser() for p in listed], path.parent
    else:
        paths = [Path(p).expanduser() for p in braceexpand(spec)]
        root = Path(os.path.commonpath([str(p.parent) for p in paths])) if paths else path.parent
    if not paths:
        raise DataError(f"{spec}: no .tar shards found")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{spec}: {len(missing)} of {len(paths)} shard(s) not found: {', '.join(missing[:3])}"
                        + (", ..." if len(missing) > 3 else ""))
    return paths, root


class TarShards(ShardedTable):
    def __init__(self, shards, *, class_names=None, image_ext: str | None = None, caption_field: str | None = None,
                 negative_fields: list[str] | None = None):
        super().__init__(shards, class_names=class_names)
        self.image_ext, self.caption_field = image_ext, caption_field
        self.negative_fields = list(negative_fields or [])
        self.reads_negatives = bool(self.negative_fields)

    def with_shards(self, shards):
        return TarShards(shards, class_names=self.class_names, image_ext=self.image_ext,
                         caption_field=self.caption_field, negative_fields=self.negative_fields)

    def open_shard(self, shard: Shard) -> ShardIndex:
        return index_shard(shard.path, shard.name, labelled=self.has_labels, image_ext=self.image_ext,
                           caption_field=self.caption_field, negative_fields=self.negative_fields)


def read_shards(spec: str, *, image_column: str | None = None, caption_column: str | None = None,
                negative_fields: list[str] | None = None) -> TarShards:
    """`negative_fields`: keys of each sample's json member holding its hard-negative captions."""
    paths, root = shard_paths(spec)
    counts, class_names = _manifest_counts(paths, root)
    shards = []
    for path in paths:
        name = _name(path, root)
        count = counts.get(path.resolve())
        if count is None:  # no manifest: one scan of this shard's headers
            count = len(index_shard(path, name, labelled=False, image_ext=image_column, caption_field=caption_column).keys)
        shards.append(Shard(path, count, name))
    if not sum(s.count for s in shards):
        raise DataError(f"{spec}: the shards hold no samples")
    return TarShards(shards, class_names=class_names, image_ext=image_column,
                     caption_field=caption_column, negative_fields=negative_fields)


def _name(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _manifest_counts(paths: list[Path], root: Path) -> tuple[dict[Path, int], list[str] | None]:
    """Sample counts from `manifest.json` (ours) or img2dataset's `<shard>_stats.json`."""
    counts: dict[Path, int] = {}
    class_names = None
    for folder in sorted({p.parent for p in paths}):
        manifest = folder / MANIFEST
        if manifest.is_file():
            try:
                data = json.loads(manifest.read_text())
                assert data.get("format") == MANIFEST_FORMAT
                for entry in data["shards"]:
                    counts[(folder / entry["file"]).resolve()] = int(entry["samples"])
                class_names = data.get("class_names") or class_names
            except (OSError, ValueError, KeyError, TypeError, AssertionError) as err:
                raise DataError(f"{manifest}: not a {MANIFEST_FORMAT} manifest ({err.__class__.__name__}: {err}); "
                                "remove it to have the shards counted, or write it again with `mlxclip shard`") from None
    for path in paths:
        stats = path.with_name(path.stem + "_stats.json")
        if path.resolve() not in counts and stats.is_file():
            try:
                counts[path.resolve()] = int(json.loads(stats.read_text())["successes"])
            except (OSError, ValueError, KeyError, TypeError):
                pass  # not img2dataset's: the shard is counted by a scan instead
    return counts, class_names


def index_shard(path: Path, name: str, *, labelled: bool, image_ext: str | None = None,
                caption_field: str | None = None, negative_fields: list[str] | None = None) -> ShardIndex:
    """The samples of one shard in file order, from its tar headers alone: where each member lies.
    Captions and labels are read with the sample (`_Texts`), so indexing a shard costs one pass
    over its headers. A member cut off by a truncated file, or a sample without an image, is a
    problem of that sample; a file that is not a tar is refused."""
    index = ShardIndex([], [], [], [])
    try:
        archive = tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError) as err:
        raise DataError(f"{name}: cannot open the shard as a tar file ({err})") from None
    size = path.stat().st_size
    shard = _OpenShard(path)
    with archive:
        members: dict[str, tarfile.TarInfo] = {}
        key = None
        try:
            for member in archive:
                match = _KEY.match(member.name) if member.isfile() else None
                if match is None:
                    continue
                if match.group(1) != key and key is not None:
                    _add(index, key, members, shard, size, labelled, image_ext, caption_field, negative_fields)
                    members = {}
                key = match.group(1)
                members[match.group(2).lower()] = member
        except tarfile.TarError as err:
            index.problems[len(index.keys)] = f"the shard is truncated or corrupt after this point ({err})"
        if key is not None:
            _add(index, key, members, shard, size, labelled, image_ext, caption_field, negative_fields)
    return index


def _add(index: ShardIndex, key: str, members: dict[str, tarfile.TarInfo], shard: _OpenShard, size: int, labelled: bool,
         image_ext: str | None, caption_field: str | None, negative_fields: list[str] | None = None) -> None:
    number = len(index.keys)
    index.keys.append(key)
    wanted = (image_ext.lower(),) if image_ext else IMAGE_EXTENSIONS
    image = next((members[e] for e in wanted if e in members), None)
    problem = index.problems.get(number)
    if image is None:
        problem = problem or f"no image member ({', '.join(wanted)})"
    elif image.offset_data + image.size > size:
        problem = problem or "the image is cut off (truncated shard)"
    index.images.append(None if problem else _Range(shard, image.offset_data, image.size))
    if problem is not None:
        index.problems[number] = problem
    ranges = {ext: _Range(shard, m.offset_data, m.size) for ext, m in members.items()
              if ext in ("txt", "json", "cls") or ext == (caption_field or "").lower()}
    index.captions.append(_Texts(ranges, caption_field, labelled, negative_fields or []))
    index.labels.append(None)


class _Texts:
    """A sample's caption, label and hard-negative captions, read when the sample is first read and
    kept while its shard is open: (caption, label, problem or None, negatives)."""

    __slots__ = ("ranges", "field", "labelled", "negative_fields", "read")

    def __init__(self, ranges: dict[str, _Range], field: str | None, labelled: bool, negative_fields: list[str]):
        self.ranges, self.field, self.labelled, self.negative_fields = ranges, field, labelled, negative_fields
        self.read: tuple[str, int | None, str | None, tuple[str, ...]] | None = None

    def __call__(self) -> tuple[str, int | None, str | None, tuple[str, ...]]:
        if self.read is None:
            self.read = self._read()
        return self.read

    def _read(self) -> tuple[str, int | None, str | None, tuple[str, ...]]:
        try:
            record = self._record()
            caption = " ".join(self._caption(record).split())
            label = int(self.ranges["cls"]().decode()) if self.labelled and "cls" in self.ranges else None
            negatives, problem = self._negatives(record)
        except (ImageError, OSError, ValueError, UnicodeDecodeError) as err:
            return "", None, f"unreadable caption or label ({err.__class__.__name__}: {err})", ()
        if not caption:
            return "", None, "no caption (" + ("no txt or json member" if self.field is None else
                                               f"no {self.field!r} member or json field") + ")", ()
        if self.labelled and label is None:
            return caption, None, "no cls member (the shards' manifest names classes)", ()
        return caption, label, problem, negatives

    def _caption_member(self) -> str | None:
        """The member holding the caption as its whole text (the named one, else txt), if any."""
        field = (self.field or "").lower()
        if field and field in self.ranges:
            return field
        return "txt" if not field and "txt" in self.ranges else None

    def _record(self) -> dict | None:
        """The json member, read once, when the caption or the negatives come from it."""
        if "json" not in self.ranges or (self._caption_member() is not None and not self.negative_fields):
            return None
        record = json.loads(self.ranges["json"]().decode("utf-8"))
        return record if isinstance(record, dict) else None

    def _negatives(self, record: dict | None) -> tuple[tuple[str, ...], str | None]:
        if not self.negative_fields or record is None:
            return (), None
        return cell_negatives([record.get(f) for f in self.negative_fields], self.negative_fields)

    def _caption(self, record: dict | None) -> str:
        member = self._caption_member()
        if member is not None:
            return self.ranges[member]().decode("utf-8")
        value = record.get(self.field or "caption") if record is not None else None
        return value if isinstance(value, str) else ""


class _OpenShard:
    """One open file per indexed shard, read with `os.pread`: any thread, any order, no seek
    shared. It closes when the last member reader of the shard is gone."""

    def __init__(self, path: Path):
        self.path, self.file = path, open(path, "rb")

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.file.fileno(), size, offset)

    def __del__(self):
        self.file.close()


class _Range:
    """Reads one member's bytes by offset."""

    __slots__ = ("shard", "offset", "size")

    def __init__(self, shard: _OpenShard, offset: int, size: int):
        self.shard, self.offset, self.size = shard, offset, size

    def __call__(self) -> bytes:
        data = self.shard.read(self.offset, self.size)
        if len(data) != self.size:
            raise ImageError(f"{self.shard.path.name}: member cut off at byte {self.offset + len(data)} "
                             "(truncated shard)")
        return data
