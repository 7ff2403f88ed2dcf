"""Captions files -> `Sample`s: CSV/TSV (delimiter sniffed) or JSONL, several captions per image
allowed, image paths relative to the file. Every problem is one DataError naming file, line and
field."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from mlx_clip.data.sample import Sample
from mlx_clip.errors import DataError

IMAGE_COLUMNS = ("image", "filepath")
CAPTION_COLUMNS = ("caption", "title")
_SHOW = 3  # how many offending paths an error message lists before "..."


def read_captions(
    path: str | Path, *, image_column: str | None = None, caption_column: str | None = None
) -> list[Sample]:
    """Read a CSV/TSV/JSONL captions file; rows naming the same image share one `image_id`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: captions file not found")
    text = read_text_file(path)
    if not text.strip():
        raise DataError(f"{path}: file is empty; expected a header line and one row per caption")
    if _is_jsonl(path, text):
        rows = _jsonl_rows(path, text, image_column, caption_column)
    else:
        rows = _delimited_rows(path, text, image_column, caption_column)
    if not rows:
        raise DataError(f"{path}: no rows after the header; expected one row per caption")
    return _to_samples(path, rows)


def read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not UTF-8 text (byte {e.start}); save the file as UTF-8"
        ) from None


def _is_jsonl(path: Path, text: str) -> bool:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return True
    if suffix in (".csv", ".tsv"):
        return False
    return text.lstrip().startswith("{")


def _pick_column(
    where: str,
    found: list[str],
    wanted: str | None,
    defaults: tuple[str, ...],
    role: str,
    what: str,
) -> str:
    """The column (or JSON key) for `role`: the one named, else the first default present."""
    by_lower = {name.strip().lower(): name for name in found}
    for candidate in (wanted,) if wanted else defaults:
        if candidate.strip().lower() in by_lower:
            return by_lower[candidate.strip().lower()]
    rule = f"named {wanted!r}" if wanted else "named " + " or ".join(repr(d) for d in defaults)
    listed = ", ".join(map(repr, found)) or "none"
    raise DataError(f"{where}: no {role} {what} {rule}; {what}s found: {listed}")


def _sniff_delimiter(path: Path, header: str) -> str:
    fallback = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        delimiter = csv.Sniffer().sniff(header, delimiters=",\t;|").delimiter
    except csv.Error:
        return fallback
    # A one-column header sniffs as anything; only trust a delimiter the header really contains.
    return delimiter if delimiter in header else fallback


def _delimited_rows(
    path: Path, text: str, image_column: str | None, caption_column: str | None
) -> list[tuple[int, str, str]]:
    header_line = next(line for line in text.splitlines() if line.strip())
    delimiter = _sniff_delimiter(path, header_line)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        records = [(reader.line_num, cells) for cells in reader if any(c.strip() for c in cells)]
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num + 1}: not valid CSV/TSV ({e})") from None
    header_at, header = records[0]
    header = [cell.strip() for cell in header]
    where = f"{path}:{header_at}"
    image_key = _pick_column(where, header, image_column, IMAGE_COLUMNS, "image", "column")
    caption_key = _pick_column(where, header, caption_column, CAPTION_COLUMNS, "caption", "column")
    image_at, caption_at = header.index(image_key), header.index(caption_key)
    rows = []
    for line, cells in records[1:]:
        if len(cells) != len(header):
            raise DataError(
                f"{path}:{line}: {len(cells)} fields where the header has {len(header)} "
                f"(delimiter {delimiter!r}); quote values that contain the delimiter"
            )
        rows.append(
            _check_row(path, line, cells[image_at], cells[caption_at], image_key, caption_key)
        )
    return rows


def _jsonl_rows(
    path: Path, text: str, image_column: str | None, caption_column: str | None
) -> list[tuple[int, str, str]]:
    rows = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line}: bad JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(
                f"{path}:{line}: expected a JSON object per line, got {type(record).__name__}"
            )
        keys = list(record)
        image_key = _pick_column(
            f"{path}:{line}", keys, image_column, IMAGE_COLUMNS, "image", "key"
        )
        caption_key = _pick_column(
            f"{path}:{line}", keys, caption_column, CAPTION_COLUMNS, "caption", "key"
        )
        image, captions = record[image_key], record[caption_key]
        if not isinstance(image, str):
            raise DataError(f"{path}:{line}: {image_key!r} must be a path string, got {image!r}")
        if isinstance(captions, str):
            captions = [captions]
        if (
            not isinstance(captions, list)
            or not captions
            or not all(isinstance(c, str) for c in captions)
        ):
            raise DataError(
                f"{path}:{line}: {caption_key!r} must be a string or a non-empty list of strings, "
                f"got {captions!r}"
            )
        rows.extend(_check_row(path, line, image, c, image_key, caption_key) for c in captions)
    return rows


def _check_row(
    path: Path, line: int, image: str, caption: str, image_key: str, caption_key: str
) -> tuple[int, str, str]:
    image, caption = image.strip(), " ".join(caption.split())
    if not image:
        raise DataError(
            f"{path}:{line}: column {image_key!r} is empty; each row needs an image path"
        )
    if not caption:
        raise DataError(f"{path}:{line}: column {caption_key!r} is empty for image {image!r}")
    return line, image, caption


def _to_samples(path: Path, rows: list[tuple[int, str, str]]) -> list[Sample]:
    base = path.resolve().parent
    ids: dict[Path, int] = {}
    missing: list[str] = []
    samples = []
    for line, image, caption in rows:
        file = (base / Path(image).expanduser()).resolve()
        if file not in ids:
            ids[file] = len(ids)
            if not file.is_file():
                missing.append(f"line {line}: {image}")
        samples.append(Sample(image=file, caption=caption, image_id=ids[file]))
    if missing:
        shown = "; ".join(missing[:_SHOW]) + ("; ..." if len(missing) > _SHOW else "")
        raise DataError(
            f"{path}: {len(missing)} of {len(ids)} image(s) not found "
            f"(paths are relative to {base}): {shown}"
        )
    return samples
