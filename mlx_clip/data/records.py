"""Read a dataset from disk into `Sample`s: captions files, class folders, given or seeded splits.

Two layouts are accepted, detected from the path:

- captions: a CSV/TSV file (columns `image`/`filepath` and `caption`/`title`) or a JSONL file
  (`{"image": ..., "caption": "..." | [...]}`), or a folder holding exactly one such file;
  image paths are relative to the captions file's folder;
- class folders: `ROOT/<class name>/*.{jpg,jpeg,png,webp,bmp}`; each image gets a caption made
  from a prompt template and its class name, so classes train contrastively like captions (FLYP,
  Goyal et al. 2022) and zero-shot evaluation uses the same prompts.

A folder with `train/` and `val/` (or `validation/`) subfolders, each in one of these layouts, is a
given split; otherwise `split_samples` makes a seeded one.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from mlx_clip.data.captions import negative_columns, read_captions, read_text_file
from mlx_clip.data.sample import Sample
from mlx_clip.data.table import SampleTable
from mlx_clip.data.templates import DEFAULT_TEMPLATES, check_template, check_templates, fill
from mlx_clip.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
CAPTION_EXTENSIONS = frozenset({".csv", ".tsv", ".jsonl", ".ndjson"})
TRAIN_DIRS = ("train",)
VAL_DIRS = ("val", "validation")


@dataclass
class ClassFolderDataset:
    """What `read_class_folders` found: one captioned sample per image, plus what it skipped."""

    samples: SampleTable
    class_names: list[str]  # folder names, in label order
    templates: list[str]
    skipped: list[Path] = field(default_factory=list)  # files that are not images, never silent


@dataclass
class Dataset:
    """A dataset in any layout, as the trainer and the evaluator take it."""

    samples: SampleTable
    class_names: list[str] | None
    templates: list[str] | None
    kind: str  # "captions" | "class_folders"
    source: Path
    val: SampleTable | None = None  # the given validation split (train/ + val/ folders), if any
    skipped: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# class folders, templates, class lists


def _list_lines(path: Path, what: str) -> list[tuple[int, str]]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: {what} file not found")
    lines = [(n, raw.strip()) for n, raw in enumerate(read_text_file(path).splitlines(), start=1)]
    lines = [(n, text) for n, text in lines if text and not text.startswith("#")]
    if not lines:
        raise DataError(
            f"{path}: no {what} in the file (one per line; lines starting with '#' are comments)"
        )
    return lines


def load_templates(path: str | Path) -> list[str]:
    """Prompt templates, one per line, each with one `{}`; blank lines and `#` lines skipped."""
    return [
        check_template(text, f"{path}:{n}: template")
        for n, text in _list_lines(Path(path), "templates")
    ]


def load_classes(path: str | Path, root: str | Path | None = None) -> list[str]:
    """Class names, one per line, in label order; checked against `root`'s folders when given."""
    lines = _list_lines(Path(path), "class names")
    seen: dict[str, int] = {}
    for n, name in lines:
        if name in seen:
            raise DataError(f"{path}:{n}: class {name!r} already listed on line {seen[name]}")
        seen[name] = n
    names = list(seen)
    if root is not None:
        _check_class_list(names, _class_dirs(Path(root)), str(path), Path(root))
    return names


def _class_dirs(root: Path) -> list[str]:
    if not root.is_dir():
        raise DataError(f"{root}: folder not found")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_class_list(names: list[str], folders: list[str], source: str, root: Path) -> None:
    missing = [n for n in names if n not in folders]
    extra = [f for f in folders if f not in names]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} listed class(es) have no folder: {', '.join(missing)}")
        if extra:
            parts.append(f"{len(extra)} folder(s) are not listed: {', '.join(extra)}")
        raise DataError(f"{source} does not match the class folders in {root}: {'; '.join(parts)}")


def read_class_folders(
    root: str | Path,
    *,
    templates: list[str] | None = None,
    classes: list[str] | None = None,
    seed: int = 0,
    first_image_id: int = 0,
) -> ClassFolderDataset:
    """One sample per image under `ROOT/<class>/`, captioned by a seeded choice of template.

    `classes` fixes the label order (and must match the folders); by default it is the sorted
    folder names.
    """
    root = Path(root).expanduser()
    folders = _class_dirs(root)
    if not folders:
        raise DataError(
            f"{root}: no class folders; expected ROOT/<class name>/*.jpg (one folder per class)"
        )
    if classes is None:
        classes = folders
    else:
        _check_class_list(list(classes), folders, "the class list", root)
    templates = check_templates(list(DEFAULT_TEMPLATES) if templates is None else templates)
    # Top-level files (a README, a classes.txt) are not images of any class: report, don't guess.
    skipped = sorted(p for p in root.iterdir() if not p.is_dir() and not p.name.startswith("."))
    rng = np.random.default_rng(seed)
    images: list[pa.Array] = []
    label_column, caption_choice = [], []
    captions = [fill(template, name) for name in classes for template in templates]
    for label, name in enumerate(classes):
        found, other = _class_images(root / name)
        skipped.extend(other)
        if not found:
            raise DataError(
                f"{root / name}: class folder {name!r} has no images "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))}); remove it or add images"
            )
        picks = rng.integers(len(templates), size=len(found))
        images.append(pa.array([f"{name}/{file}" for file in found], pa.string()))
        label_column.append(np.full(len(found), label, np.int64))
        caption_choice.append(label * len(templates) + picks)
    if skipped:
        log.warning(
            "%s: skipped %d file(s) that are not images, e.g. %s", root, len(skipped), skipped[0]
        )
    labels = np.concatenate(label_column)
    table = SampleTable(pa.concat_arrays(images), pa.array(captions, pa.string()).take(np.concatenate(caption_choice)),
                        first_image_id + np.arange(len(labels)), labels, base=root.resolve())
    return ClassFolderDataset(table, list(classes), templates, skipped)


def _class_images(folder: Path) -> tuple[list[str], list[Path]]:
    """The image file names in `folder`, sorted, and the other entries (as paths): one directory
    scan, no stat per file where the file system reports types."""
    images, other = [], []
    with os.scandir(folder) as entries:
        listed = sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)
    for entry in listed:
        is_image = os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file()
        if is_image:
            images.append(entry.name)
        else:
            other.append(folder.resolve() / entry.name)
    return images, other


# ---------------------------------------------------------------------------------------------
# layout detection and the one entry point


def _split_dirs(path: Path) -> tuple[Path, Path] | None:
    names = {p.name.lower(): p for p in path.iterdir() if p.is_dir()}
    train = next((names[n] for n in TRAIN_DIRS if n in names), None)
    val = next((names[n] for n in VAL_DIRS if n in names), None)
    return (train, val) if train and val else None


def _captions_files(path: Path) -> list[Path]:
    return sorted(
        p
        for p in path.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in CAPTION_EXTENSIONS
    )


def _layout(path: Path) -> tuple[str, Path]:
    """(kind, the file or folder to read) for a path that is not a given split."""
    if path.is_file():
        if path.suffix.lower() not in CAPTION_EXTENSIONS:
            raise DataError(
                f"{path}: not a captions file; expected {', '.join(sorted(CAPTION_EXTENSIONS))}"
            )
        return "captions", path
    files = _captions_files(path)
    if len(files) > 1:
        raise DataError(
            f"{path}: several captions files ({', '.join(p.name for p in files)}); pass one of them"
        )
    if files:
        return "captions", files[0]
    for sub in path.iterdir():
        if sub.is_dir() and not sub.name.startswith("."):
            if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in sub.iterdir() if p.is_file()):
                return "class_folders", path
    lone = sorted(p.name for p in path.iterdir() if p.name.lower() in TRAIN_DIRS + VAL_DIRS)
    hint = f"; it has {lone[0]}/ alone: pass {path / lone[0]} itself" if len(lone) == 1 else ""
    raise DataError(
        f"{path}: not a dataset; expected a captions file (CSV/TSV with image,caption columns, or "
        "JSONL) or class folders ROOT/<class name>/*.jpg, optionally inside train/ and val/; or webdataset .tar "
        "shards or .parquet files" + hint
    )


def detect_layout(path: str | Path) -> str:
    """`"captions"` or `"class_folders"`; a given split reports the layout of its train/ folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    split = _split_dirs(path) if path.is_dir() else None
    return _layout(split[0] if split else path)[0]


def load_dataset(
    path: str | Path,
    *,
    templates: list[str] | str | Path | None = None,
    classes: list[str] | str | Path | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    seed: int = 0,
    split: str | None = None,
    negative_column: str | None = None,
) -> Dataset:
    """Read any accepted layout; `templates`/`classes` (lists or files) apply to class folders.
    Shards and parquet (`split` picks a Hugging Face dataset's split) are read where they lie.
    `negative_column` names captions files' hard-negative captions (`read_captions`)."""
    if isinstance(templates, (str, Path)):
        templates = load_templates(templates)
    if isinstance(classes, (str, Path)):
        classes = load_classes(classes)
    streamed = _read_streamed(str(path), image_column, caption_column, split, templates, negative_column)
    if streamed is not None:
        return _streamed_dataset(streamed, path, templates, classes)
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    split = _split_dirs(path) if path.is_dir() else None
    if split is None:
        return _load_one(path, path, templates, classes, image_column, caption_column, seed, 0, negative_column)
    train = _load_one(split[0], path, templates, classes, image_column, caption_column, seed, 0, negative_column)
    val = _load_val(split[1], train, image_column, caption_column, seed)
    train.val, train.skipped = val.samples, train.skipped + val.skipped
    return train


def _read_streamed(spec: str, image_column, caption_column, split, templates, negative_column=None):
    from mlx_clip.data.parquet import is_parquet_spec, read_parquet
    from mlx_clip.data.shards import is_shard_spec, read_shards

    if is_shard_spec(spec):
        return read_shards(spec, image_column=image_column, caption_column=caption_column,
                           negative_fields=negative_columns(negative_column))
    if is_parquet_spec(spec):
        return read_parquet(spec, image_column=image_column, caption_column=caption_column, split=split,
                            templates=None if templates is None else check_templates(templates),
                            negative_columns=negative_columns(negative_column))
    return None


def _streamed_dataset(samples, source, templates, classes) -> Dataset:
    if samples.class_names is None:
        return Dataset(samples, None, None, "captions", Path(str(source)))
    if classes is not None and list(classes) != list(samples.class_names):
        raise DataError(f"{source}: its classes ({', '.join(samples.class_names[:5])}, ...) differ from the class list "
                        "given; class indices must mean the same class")
    templates = check_templates(list(DEFAULT_TEMPLATES) if templates is None else templates)
    return Dataset(samples, list(samples.class_names), templates, "class_folders", Path(str(source)))


def _load_one(
    path, source, templates, classes, image_column, caption_column, seed, first_id=0, negative_column=None
) -> Dataset:
    kind, target = _layout(path)
    if kind == "captions":
        samples = read_captions(target, image_column=image_column, caption_column=caption_column,
                                negative_column=negative_column)
        return Dataset(samples.with_ids_from(first_id), None, None, kind, source)
    if negative_column is not None:
        raise DataError(f"{path}: class folders have no captions to hold hard negatives (--negative-column); "
                        "give a captions file with a column of them")
    data = read_class_folders(
        target, templates=templates, classes=classes, seed=seed, first_image_id=first_id
    )
    return Dataset(
        data.samples, data.class_names, data.templates, kind, source, skipped=data.skipped
    )


def _load_val(path: Path, train: Dataset, image_column, caption_column, seed) -> Dataset:
    first_id = 1 + int(train.samples.image_ids.max(initial=-1))
    kind = _layout(path)[0]
    if kind != train.kind:
        raise DataError(f"{path}: validation split is {kind} but the train split is {train.kind}")
    if kind == "captions":
        return _load_one(path, path, None, None, image_column, caption_column, seed, first_id)
    # Labels must mean the same class in both splits; val may lack classes, never add new ones.
    folders = _class_dirs(path)
    unknown = [f for f in folders if f not in train.class_names]
    if unknown:
        raise DataError(f"{path}: class folder(s) not in the train split: {', '.join(unknown)}")
    val = _load_one(
        path, path, train.templates, folders, image_column, caption_column, seed + 1, first_id
    )
    remap = [train.class_names.index(name) for name in folders]
    val.samples = val.samples.with_labels(np.asarray(remap, np.int64)[val.samples.labels])
    return val


# ---------------------------------------------------------------------------------------------
# seeded split


def split_samples(
    samples: Sequence[Sample], val_fraction: float, seed: int = 0
) -> tuple[SampleTable, SampleTable]:
    """Seeded (train, val) split by image: all captions of an image land on the same side.

    Labelled samples are split per class, so every class with at least 2 images has at least one
    image in val and one in train. Both keep the input order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if hasattr(samples, "split_shards"):  # read in shards: whole shards are held out
        return samples.split_shards(val_fraction, seed)
    table = SampleTable.from_samples(samples)
    ids, first = _images_in_order(table)
    label_of = table.labels[first] if table.labels is not None else None
    rng = np.random.default_rng(seed)
    val_ids = []
    for label in (np.unique(label_of) if label_of is not None else [None]):
        stratum = ids if label is None else ids[label_of == label]
        n_val = _n_val(len(stratum), val_fraction)
        val_ids.append(stratum[rng.permutation(len(stratum))[:n_val]])
    in_val = np.isin(table.image_ids, np.concatenate(val_ids))
    return table.take(np.flatnonzero(~in_val)), table.take(np.flatnonzero(in_val))


def _images_in_order(table: SampleTable) -> tuple[np.ndarray, np.ndarray]:
    """The distinct image ids in order of first appearance, and the row where each first appears."""
    ids, first = np.unique(table.image_ids, return_index=True)
    order = np.argsort(first, kind="stable")
    return ids[order], first[order]


def _n_val(n: int, fraction: float) -> int:
    if fraction == 0.0 or n < 2:
        return 0
    return min(max(int(round(n * fraction)), 1), n - 1)


def class_counts(samples: Sequence[Sample]) -> Counter:
    """Images per label (one count per image_id), for reports and split checks."""
    table = SampleTable.from_samples(samples)
    if table.labels is None:
        return Counter({None: len(np.unique(table.image_ids))})
    _, first = _images_in_order(table)
    return Counter(dict(zip(*(a.tolist() for a in np.unique(table.labels[first], return_counts=True)))))
