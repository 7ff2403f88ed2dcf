"""Captions files -> `Sample`s: CSV/TSV (delimiter sniffed) or JSONL, several captions per image
allowed, image paths relative to the file. Every problem is one DataError naming file, line and
field."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlx_clip.data.table import NEGATIVES_TYPE, SampleTable
from mlx_clip.errors import DataError

IMAGE_COLUMNS = ("image", "filepath")
CAPTION_COLUMNS = ("caption", "title")
# Every character str.split() splits on (str.isspace), as an RE2 class for pyarrow's regex kernels.
_WHITESPACE = "".join(chr(c) for c in range(0x3001) if chr(c).isspace())
_WHITESPACE_RUN = "[" + "".join(f"\\x{{{ord(c):x}}}" for c in _WHITESPACE) + "]+"
_SHOW = 3  # how many offending paths an error message lists before "..."


def read_captions(
    path: str | Path, *, image_column: str | None = None, caption_column: str | None = None,
    negative_column: str | None = None,
) -> SampleTable:
    """Read a CSV/TSV/JSONL captions file; rows naming the same image share one `image_id`.

    `negative_column`: one or more comma-separated columns (JSONL keys) of hard-negative captions;
    an empty cell (a missing or null key) is none, a JSONL value may be a list.

    Rows are read as a stream into column chunks, so a file of millions of rows costs its columns
    (tens of bytes a row), not a Python object per row."""
    negative_names = negative_columns(negative_column)
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: captions file not found")
    columns = None
    try:
        with path.open(encoding="utf-8-sig", newline="") as file:
            first = _first_line(file)
        if first is None:
            raise DataError(f"{path}: file is empty; expected a header line and one row per caption")
        jsonl = _is_jsonl(path, first)
        if not jsonl:
            columns = _fast_delimited(path, first, image_column, caption_column, negative_names)
        if columns is None:
            columns = _python_rows(path, jsonl, first, image_column, caption_column, negative_names)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start} of a block); save the file as UTF-8") from None
    if not columns.rows:
        raise DataError(f"{path}: no rows after the header; expected one row per caption")
    if negative_names and not columns.negative_count:
        raise DataError(f"{path}: no row has a hard-negative caption in {' or '.join(map(repr, negative_names))} "
                        "(--negative-column); every cell is empty")
    table = _to_table(path, columns,
                      lambda: _python_rows(path, jsonl, first, image_column, caption_column, negative_names))
    # pyarrow's allocator keeps what reading freed (the raw blocks, the columns before whitespace
    # was normalised): a million rows leave ~70 MB behind that the run would never use again.
    pa.default_memory_pool().release_unused()
    return table


def negative_columns(spec: str | None) -> list[str]:
    """The column names `--negative-column` lists, comma-separated."""
    if spec is None:
        return []
    names = [name.strip() for name in spec.split(",")]
    if not all(names):
        raise DataError(f"--negative-column {spec!r}: an empty column name; give names separated by commas")
    return names


def captions_in(value) -> list[str] | None:
    """A cell's captions, whitespace normalised, empty ones left out: [] for null, None when the
    cell holds something other than a caption or a list of them."""
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        return None
    return [text for text in (" ".join(v.split()) for v in values) if text]


def cell_negatives(values: list, columns: list[str]) -> tuple[tuple[str, ...], str | None]:
    """A row's hard-negative captions from its cells (a string, a list of strings, or null), and
    why the row cannot be used when a cell holds anything else."""
    out = []
    for value, column in zip(values, columns):
        # A parquet list<string> may hold nulls among its captions: none, as a null cell is.
        texts = captions_in([t for t in value if t is not None] if isinstance(value, list) else value)
        if texts is None:
            return (), f"{column!r} (--negative-column) holds {type(value).__name__}, not captions"
        out.extend(texts)
    return tuple(out), None


def _python_rows(path: Path, jsonl: bool, first: str, image_column, caption_column,
                 negative_names: list[str]) -> _Columns:
    """Row by row with the csv/json modules: every problem named by its line."""
    columns = _Columns(negatives=bool(negative_names))
    with path.open(encoding="utf-8-sig", newline="") as file:
        if jsonl:
            _jsonl_rows(path, file, image_column, caption_column, negative_names, columns)
        else:
            _delimited_rows(path, file, first, image_column, caption_column, negative_names, columns)
    return columns


def _normalised(column: pa.Array) -> pa.Array:
    """" ".join(text.split()) on a whole column: runs of Python's whitespace become one space."""
    return pc.utf8_trim(pc.replace_substring_regex(column, _WHITESPACE_RUN, " "), _WHITESPACE)


def _negative_lists(cells: list[pa.Array]) -> pa.Array:
    """One list of hard-negative captions per row from K string columns, empty cells left out."""
    rows, k = len(cells[0]), len(cells)
    stacked = pa.concat_arrays([_normalised(c) for c in cells])  # column j's row i at j * rows + i
    row_major = stacked.take(pa.array((np.arange(k)[None, :] * rows + np.arange(rows)[:, None]).ravel()))
    present = np.asarray(pc.greater(pc.utf8_length(row_major), 0).fill_null(False))
    offsets = np.concatenate([[0], np.cumsum(present.reshape(rows, k).sum(axis=1))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), row_major.filter(pa.array(present)))


def _fast_delimited(path: Path, header_line: str, image_column, caption_column,
                    negative_names: list[str]) -> _Columns | None:
    """The whole file parsed by pyarrow's CSV reader (C++, threaded), when it is well formed: None
    sends anything unusual (a parse error, an empty cell, a blank row, text that is not UTF-8)
    through `_python_rows`, which names the line. A well-formed file gives the same columns both ways."""
    from pyarrow import csv as arrow_csv

    delimiter = _sniff_delimiter(path, header_line)
    header = next(csv.reader([header_line], delimiter=delimiter))
    names = [cell.strip() for cell in header]
    if len(set(names)) != len(names):
        return None
    image_key = _pick_column(f"{path}:1", names, image_column, IMAGE_COLUMNS, "image", "column")
    caption_key = _pick_column(f"{path}:1", names, caption_column, CAPTION_COLUMNS, "caption", "column")
    negative_keys = [_pick_column(f"{path}:1", names, name, (), "hard-negative caption", "column")
                     for name in negative_names]
    raw = {name: cell for name, cell in zip(names, header)}
    columns = _Columns(negatives=bool(negative_names))
    try:
        # Block by block: the raw text of one block and the finished columns are all that is held.
        reader = arrow_csv.open_csv(
            path,
            parse_options=arrow_csv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
            convert_options=arrow_csv.ConvertOptions(
                column_types={cell: pa.string() for cell in header},
                include_columns=list(dict.fromkeys([raw[image_key], raw[caption_key], *(raw[k] for k in negative_keys)])),
                strings_can_be_null=False, quoted_strings_can_be_null=False),
            read_options=arrow_csv.ReadOptions(block_size=4 << 20, use_threads=False))
        for block in reader:
            images = pc.utf8_trim(block.column(raw[image_key]), _WHITESPACE)
            captions = _normalised(block.column(raw[caption_key]))
            if _has_empty(images) or _has_empty(captions):
                return None
            columns.images.append(images)
            columns.captions.append(captions)
            if negative_keys:
                negatives = _negative_lists([block.column(raw[k]) for k in negative_keys])
                columns.negatives.append(negatives)
            columns.rows += len(images)
    except (pa.ArrowException, ValueError):
        return None
    return columns if columns.rows else None


class _Columns:
    """Rows gathered into arrow chunks of `CHUNK` rows: Python strings live one chunk at a time."""

    CHUNK = 1 << 16

    def __init__(self, negatives: bool = False):
        self.rows = 0
        self._lines: list[int] = []
        self._images: list[str] = []
        self._captions: list[str] = []
        self._negatives: list[list[str]] = []
        self.lines, self.images, self.captions = [], [], []
        self.negatives: list[pa.Array] | None = [] if negatives else None

    def add(self, line: int, image: str, caption: str, negatives: list[str] | None = None) -> None:
        self._lines.append(line)
        self._images.append(image)
        self._captions.append(caption)
        if self.negatives is not None:
            self._negatives.append(negatives or [])
        self.rows += 1
        if len(self._images) >= self.CHUNK:
            self.flush()

    def flush(self) -> None:
        if self._images:
            self.lines.append(np.array(self._lines, np.int64))
            self.images.append(pa.array(self._images, pa.string()))
            self.captions.append(pa.array(self._captions, pa.string()))
            if self.negatives is not None:
                self.negatives.append(pa.array(self._negatives, NEGATIVES_TYPE))
            self._lines, self._images, self._captions, self._negatives = [], [], [], []

    @property
    def negative_count(self) -> int:
        """Hard-negative captions read (once flushed)."""
        return sum(len(chunk.flatten()) for chunk in self.negatives or ())


def _first_line(file) -> str | None:
    for line in file:
        if line.strip():
            return line
    return None


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
    return text.lstrip().startswith("{")  # the first non-blank line


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


def _delimited_rows(path: Path, file, header_line: str, image_column: str | None, caption_column: str | None,
                    negative_names: list[str], columns: _Columns) -> None:
    delimiter = _sniff_delimiter(path, header_line)
    reader = csv.reader(file, delimiter=delimiter)
    header: list[str] | None = None
    try:
        for cells in reader:
            if not any(c.strip() for c in cells):
                continue
            if header is None:
                header = [cell.strip() for cell in cells]
                where = f"{path}:{reader.line_num}"
                image_key = _pick_column(where, header, image_column, IMAGE_COLUMNS, "image", "column")
                caption_key = _pick_column(where, header, caption_column, CAPTION_COLUMNS, "caption", "column")
                image_at, caption_at = header.index(image_key), header.index(caption_key)
                negatives_at = [header.index(_pick_column(where, header, name, (), "hard-negative caption", "column"))
                                for name in negative_names]
                continue
            line = reader.line_num
            if len(cells) != len(header):
                raise DataError(
                    f"{path}:{line}: {len(cells)} fields where the header has {len(header)} "
                    f"(delimiter {delimiter!r}); quote values that contain the delimiter"
                )
            columns.add(*_check_row(path, line, cells[image_at], cells[caption_at], image_key, caption_key),
                        [text for at in negatives_at for text in captions_in(cells[at])])
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num + 1}: not valid CSV/TSV ({e})") from None
    columns.flush()


def _jsonl_rows(path: Path, file, image_column: str | None, caption_column: str | None, negative_names: list[str],
                columns: _Columns) -> None:
    for line, raw in enumerate(file, start=1):
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
        negatives = _jsonl_negatives(path, line, record, negative_names)
        for caption in captions:
            columns.add(*_check_row(path, line, image, caption, image_key, caption_key), negatives)
    columns.flush()


def _jsonl_negatives(path: Path, line: int, record: dict, names: list[str]) -> list[str]:
    """A row's hard-negative captions: each named key a string or a list of strings; a missing or
    null key, or an empty string, is none."""
    by_lower = {key.strip().lower(): key for key in record}
    out = []
    for name in names:
        key = by_lower.get(name.lower())
        value = record[key] if key is not None else None
        texts = captions_in(value)
        if texts is None:
            raise DataError(f"{path}:{line}: {key!r} (--negative-column) must be a string or a list of strings, "
                            f"got {value!r}")
        out.extend(texts)
    return out


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


def _has_empty(column: pa.Array) -> bool:
    return column.null_count > 0 or pc.min(pc.utf8_length(column)).as_py() == 0


def _to_table(path: Path, columns: _Columns, with_lines: Callable[[], _Columns]) -> SampleTable:
    base = str(path.resolve().parent)
    images = pa.chunked_array(columns.images, pa.string())
    # Rows naming one file (also as "./a.jpg" and "a.jpg") share an id, in order of first mention;
    # each distinct name is normalised and checked once.
    names = pc.unique(images)  # in order of first mention
    files = pa.chunked_array([pa.array([os.path.normpath(os.path.join(base, os.path.expanduser(name)))
                                        for name in names.slice(start, _Columns.CHUNK).to_pylist()], pa.string())
                              for start in range(0, len(names), _Columns.CHUNK)] or [pa.array([], pa.string())])
    canonical = pc.dictionary_encode(files.combine_chunks())
    image_ids = np.asarray(canonical.indices)[np.asarray(pc.index_in(images, value_set=names))].astype(np.int64)
    missing = _missing(canonical.dictionary)
    if missing and not columns.lines:  # the fast reader kept no line numbers: read again for the message
        return _to_table(path, with_lines(), with_lines)
    if missing:
        lines = np.concatenate(columns.lines)
        first_row = np.unique(image_ids, return_index=True)[1]  # ids count up from 0: the row naming each first
        shown = "; ".join(f"line {lines[first_row[i]]}: {images[int(first_row[i])].as_py()}"
                          for i in missing[:_SHOW])
        raise DataError(
            f"{path}: {len(missing)} of {len(canonical.dictionary)} image(s) not found "
            f"(paths are relative to {base}): {shown}" + ("; ..." if len(missing) > _SHOW else "")
        )
    negatives = None if columns.negatives is None else pa.chunked_array(columns.negatives, NEGATIVES_TYPE)
    return SampleTable(images, pa.chunked_array(columns.captions, pa.string()), image_ids, base=base,
                       negatives=negatives)


def _missing(files: pa.Array) -> list[int]:
    """Indices of the files that are not there (a stat each, one chunk of names at a time)."""
    missing = []
    for start in range(0, len(files), _Columns.CHUNK):
        for offset, name in enumerate(files.slice(start, _Columns.CHUNK).to_pylist()):
            if not os.path.isfile(name):
                missing.append(start + offset)
    return missing
