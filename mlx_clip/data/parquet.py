"""Parquet datasets (how Hugging Face stores datasets), read one row group at a time with pyarrow.

`--data data.parquet`, a folder of parquet files, or `hf:org/name` (a Hugging Face dataset, its
`--split`, through huggingface_hub's cache and offline rules, as models are). The image is a column
of Hugging Face's image struct (`{"bytes", "path"}`), of raw bytes, or of paths relative to the
file; the caption a string column. `--image-column` / `--caption-column` pick them, else the first
of the usual names present. A label column with Hugging Face `ClassLabel` names makes class data.

Row groups are the shards of the seeded order (`data.stream`): their sizes come from the files'
metadata, so nothing is read before the first batch but the footers. A row group that cannot be
read counts each of its rows as a bad sample.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mlx_clip.data.captions import cell_negatives
from mlx_clip.data.stream import Shard, ShardedTable, ShardIndex
from mlx_clip.data.templates import DEFAULT_TEMPLATES, fill
from mlx_clip.errors import DataError

IMAGE_COLUMNS = ("image", "jpg", "img", "png", "webp", "filepath")
CAPTION_COLUMNS = ("caption", "text", "txt", "title", "sentence")
LABEL_COLUMNS = ("label", "labels", "cls")
HF_PREFIX = "hf:"


def is_parquet_spec(text: str) -> bool:
    path = Path(text).expanduser()
    if text.startswith(HF_PREFIX):
        return True
    if path.is_file():
        return path.suffix.lower() == ".parquet"
    return path.is_dir() and any(path.glob("*.parquet")) and not any(path.glob("*.tar"))


class ParquetRows(ShardedTable):
    def __init__(self, shards, *, class_names=None, columns: dict | None = None,
                 templates: list[str] | None = None):
        """Without a caption column, class data are captioned from `templates` and the class name,
        as class folders are; a row's template is drawn from `default_rng([row group, row])`."""
        super().__init__(shards, class_names=class_names)
        self.columns = columns or {}
        self.templates = templates
        self.reads_negatives = bool(self.columns.get("negatives"))

    def with_shards(self, shards):
        return ParquetRows(shards, class_names=self.class_names, columns=self.columns,
                           templates=self.templates)

    def open_shard(self, shard: Shard) -> ShardIndex:
        file, group = shard.path, int(shard.name.rsplit("#", 1)[1])
        image, caption, label = self.columns["image"], self.columns["caption"], self.columns.get("label")
        negative_columns = self.columns.get("negatives") or []
        try:
            wanted = list(dict.fromkeys(c for c in (image, caption, label, *negative_columns) if c))
            table = pq.ParquetFile(file).read_row_group(group, columns=wanted)
            images = table.column(image).to_pylist()
            labels = table.column(label).to_pylist() if label else [None] * len(images)
            captions = table.column(caption).to_pylist() if caption else self._captions(labels, group)
            cells = [table.column(c).to_pylist() for c in negative_columns]
        except (OSError, pa.ArrowException, ValueError) as err:
            reason = f"row group {group} cannot be read ({err.__class__.__name__}: {str(err)[:200]})"
            return ShardIndex([f"row {i}" for i in range(shard.count)], [""] * shard.count, [None] * shard.count,
                              [None] * shard.count, {i: reason for i in range(shard.count)})
        index = ShardIndex([], [], [], [], negatives=[] if negative_columns else None)
        for row, (picture, text, cls) in enumerate(zip(images, captions, labels, strict=True)):
            negatives_problem = None
            if negative_columns:
                negatives, negatives_problem = cell_negatives([column[row] for column in cells], negative_columns)
                index.negatives.append(negatives)
            index.keys.append(f"row {row}")
            reader, problem = _image_reader(picture, file.parent)
            text = " ".join(text.split()) if isinstance(text, str) else ""
            if not text and problem is None:
                problem = f"no caption in column {caption!r}"
            if self.has_labels and not isinstance(cls, int) and problem is None:
                problem = f"no class in column {label!r}"
            if problem is None:
                problem = negatives_problem
            if problem is not None:
                index.problems[row] = problem
            index.images.append(reader)
            index.captions.append(text)
            index.labels.append(cls if isinstance(cls, int) else None)
        return index


    def _captions(self, labels: list, group: int) -> list[str]:
        templates = self.templates or list(DEFAULT_TEMPLATES)
        return [fill(templates[int(np.random.default_rng([group, row]).integers(len(templates)))],
                     self.class_names[cls]) if isinstance(cls, int) and 0 <= cls < len(self.class_names) else ""
                for row, cls in enumerate(labels)]


def _image_reader(value, folder: Path):
    """A function returning the image's bytes, or (None, why not)."""
    if isinstance(value, dict):  # Hugging Face's Image feature: {"bytes": ..., "path": ...}
        if value.get("bytes"):
            data = value["bytes"]
            return (lambda: data), None
        value = value.get("path")
    if isinstance(value, bytes) and value:
        return (lambda: value), None
    if isinstance(value, str) and value:
        path = Path(folder, value)
        return path.read_bytes, None
    return None, "no image bytes or path"


def parquet_files(spec: str, split: str | None = None) -> tuple[list[Path], Path]:
    if spec.startswith(HF_PREFIX):
        return _hub_files(spec[len(HF_PREFIX):], split)
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if split:
            files = [f for f in files if _in_split(f.relative_to(path), split)] or files
        return files, path
    return [path], path.parent


def _in_split(relative: Path, split: str) -> bool:
    """Hugging Face's layouts: `data/train-00000-of-00002.parquet`, `default/train/0000.parquet`."""
    return split in relative.parts[:-1] or re.match(rf"^{re.escape(split)}([-_.]|$)", relative.name) is not None


def _hub_files(repo_id: str, split: str | None) -> tuple[list[Path], Path]:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise DataError(f"hf:{repo_id}: huggingface_hub is not installed") from None
    try:
        folder = Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=["*.parquet", "**/*.parquet"]))
    except LocalEntryNotFoundError:
        raise DataError(f"hf:{repo_id}: not in the local Hugging Face cache and the hub cannot be reached "
                        "(HF_HUB_OFFLINE is set or there is no network)") from None
    except Exception as err:  # network stacks raise many types; the user needs one line
        raise DataError(f"hf:{repo_id}: could not fetch the dataset ({err.__class__.__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from None
    files = sorted(folder.rglob("*.parquet"))
    chosen = [f for f in files if _in_split(f.relative_to(folder), split or "train")]
    if not chosen:
        raise DataError(f"hf:{repo_id}: no parquet files for split {split or 'train'!r} "
                        f"(found: {', '.join(sorted({str(f.relative_to(folder)) for f in files})[:5]) or 'none'})")
    return chosen, folder


def read_parquet(spec: str, *, image_column: str | None = None, caption_column: str | None = None,
                 split: str | None = None, templates: list[str] | None = None,
                 negative_columns: list[str] | None = None) -> ParquetRows:
    files, root = parquet_files(spec, split)
    if not files:
        raise DataError(f"{spec}: no .parquet files found")
    shards, columns, class_names = [], None, None
    for file in files:
        try:
            metadata = pq.ParquetFile(file).metadata
            schema = pq.read_schema(file)
        except (OSError, pa.ArrowException) as err:
            raise DataError(f"{file}: not a readable parquet file ({err.__class__.__name__}: {str(err)[:200]})") from None
        if columns is None:
            columns = _columns(file, schema, image_column, caption_column)
            class_names = _class_names(schema, columns.get("label"))
            missing = [c for c in negative_columns or [] if c not in schema.names]
            if missing:
                raise DataError(f"{file}: no hard-negative caption column named {', '.join(map(repr, missing))} "
                                f"(--negative-column); columns: {', '.join(schema.names)}")
            columns["negatives"] = list(negative_columns or [])
        name = os.path.relpath(file, root)
        shards += [Shard(file, metadata.row_group(g).num_rows, f"{name}#{g}") for g in range(metadata.num_row_groups)]
    table = ParquetRows([s for s in shards if s.count], class_names=class_names, columns=columns,
                        templates=templates)
    if not len(table):
        raise DataError(f"{spec}: the parquet files hold no rows")
    if class_names is None:
        table.columns.pop("label", None)
    return table


def _columns(file: Path, schema: pa.Schema, image: str | None, caption: str | None) -> dict:
    names = schema.names

    def pick(wanted, defaults, role):
        if wanted:
            if wanted in names:
                return wanted
            raise DataError(f"{file}: no {role} column named {wanted!r}; columns: {', '.join(names)}")
        found = next((n for n in defaults if n in names), None)
        if found is None and role == "caption" and _class_names(schema, pick(None, LABEL_COLUMNS, "label")):
            return None  # class data: captioned from templates
        if found is None and role != "label":
            raise DataError(f"{file}: no {role} column named {' or '.join(map(repr, defaults))}; columns: "
                            f"{', '.join(names)} (choose one with --{role}-column)")
        return found

    return {"image": pick(image, IMAGE_COLUMNS, "image"), "caption": pick(caption, CAPTION_COLUMNS, "caption"),
            "label": pick(None, LABEL_COLUMNS, "label")}


def _class_names(schema: pa.Schema, label: str | None) -> list[str] | None:
    """The label column's names from Hugging Face's `ClassLabel` feature, kept in the schema."""
    if label is None or not schema.metadata or b"huggingface" not in schema.metadata:
        return None
    try:
        features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
        names = features[label].get("names")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return list(names) if names else None
