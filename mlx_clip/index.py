"""`mlxclip index`: an image folder -> an exact-search index that `mlxclip serve --index` serves.

An index folder holds `embeddings.safetensors` (one float32 row per image, L2-normalised),
`index.json` (the model's fingerprint, the --quantize and NaFlex patch budget the rows were
embedded with, and per row the image's path relative to the folder, its size and modification
time) and `bad_images.txt`. Building again embeds only new or changed files (size or mtime
differ), drops removed ones, and starts over if the model, --quantize or the budget changed.

The images indexed are those the server takes: files with an image's name whose bytes are JPEG,
PNG or WebP (`serve/formats.py`, the server's own list). Any other, and any file that cannot be
decoded, is skipped and listed in `bad_images.txt` with the reason.

The index is written every `FLUSH_EVERY` images or `FLUSH_SECONDS`, whichever comes first, and at
the end; Ctrl-C writes what was embedded before it stops. An interrupted build keeps its work, and
the next one embeds only what is missing.

Search is exact: the query against every row, in blocks so memory stays bounded, which is fast
enough up to a few hundred thousand images. Beyond that, an approximate index (FAISS, hnswlib)
over `embeddings.safetensors` is the tool.
"""

from __future__ import annotations

import hashlib
import json
import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from mlx_clip.data.records import IMAGE_EXTENSIONS
from mlx_clip.errors import ConfigError, DataError, ImageError
from mlx_clip.outputs import check_folder, refuse_overlap
from mlx_clip.serve.formats import HEADER_BYTES, refusal

FORMAT = "mlxclip-index"
VERSION = 1
EMBEDDINGS_FILE, INDEX_FILE, BAD_FILE = "embeddings.safetensors", "index.json", "bad_images.txt"
FLUSH_EVERY = 2048
FLUSH_SECONDS = 30.0  # the most work a crash (or a kill) can lose
SEARCH_BLOCK = 65_536
# What makes two model folders embed images alike: weights and image preprocessing.
_FINGERPRINT_GLOBS = ("config.json", "preprocessor_config.json", "open_clip_config.json", "*.safetensors",
                      "*.bin")


def model_fingerprint(folder: str | Path) -> str:
    digest = hashlib.sha256()
    folder = Path(folder)
    for pattern in _FINGERPRINT_GLOBS:
        for path in sorted(folder.glob(pattern)):
            digest.update(path.name.encode() + b"\0")
            with open(path, "rb") as handle:
                digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


class IndexInterrupted(KeyboardInterrupt):
    """Ctrl-C during a build, after what was embedded has been written: `kept` of `total` images."""

    def __init__(self, kept: int, total: int, out: Path):
        super().__init__(f"kept {kept} of {total} images in {out}")
        self.kept, self.total, self.out = kept, total, out


@dataclass
class IndexReport:
    images: int
    embedded: int
    reused: int
    removed: int
    bad: list[tuple[str, str]]
    out: Path


class ImageIndex:
    def __init__(self, embeddings: np.ndarray, entries: list[dict], meta: dict):
        self.embeddings, self.entries, self.meta = embeddings, entries, meta
        self.paths = [e["path"] for e in entries]

    def __len__(self) -> int:
        return len(self.entries)

    @classmethod
    def load(cls, folder: str | Path, *, expect_model: str | Path | None = None,
             expect_budget: int | None = None) -> "ImageIndex":
        """`expect_model`, `expect_budget` (NaFlex's patch budget): what the rows must have been
        embedded with to be compared with the server's queries."""
        folder = Path(folder)
        meta_path, emb_path = folder / INDEX_FILE, folder / EMBEDDINGS_FILE
        if not meta_path.is_file() or not emb_path.is_file():
            raise ConfigError(f"{folder}: not an index folder (needs {INDEX_FILE} and {EMBEDDINGS_FILE}; "
                              "build one with `mlxclip index`)")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{meta_path}: not valid JSON ({err})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ConfigError(f"{meta_path}: not an mlxclip index (format {meta.get('format')!r})"
                              if isinstance(meta, dict) else f"{meta_path}: not an mlxclip index")
        try:
            embeddings = load_file(str(emb_path))["embeddings"]
        except Exception as err:
            raise ConfigError(f"{emb_path}: unreadable ({type(err).__name__}: {err})") from None
        entries = meta.get("files", [])
        if embeddings.ndim != 2 or len(embeddings) != len(entries):
            raise ConfigError(f"{folder}: {EMBEDDINGS_FILE} has {embeddings.shape[0]} rows but {INDEX_FILE} lists "
                              f"{len(entries)} files; rebuild it with `mlxclip index`")
        if expect_model is not None and meta.get("model_fingerprint") != model_fingerprint(expect_model):
            raise ConfigError(f"{folder}: built with another model ({meta.get('model')}); rebuild it with "
                              f"`mlxclip index --model` for the model being served")
        built_at = meta.get("max_num_patches")
        if expect_budget is not None and built_at != expect_budget:
            # An image sized to another budget is another input: its query would not find itself.
            raise ConfigError(f"{folder}: its images were embedded at --max-num-patches {built_at}, the server embeds "
                              f"at {expect_budget}; serve with --max-num-patches {built_at}, or rebuild it with "
                              f"`mlxclip index --max-num-patches {expect_budget}`")
        return cls(embeddings.astype(np.float32, copy=False), entries, meta)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, P) unit queries -> (scores, rows), each (Q, min(k, N)), best first; exact cosine."""
        k = min(k, len(self))
        queries = np.asarray(queries, np.float32)
        best_scores = np.full((len(queries), 0), -np.inf, np.float32)
        best_rows = np.zeros((len(queries), 0), np.int64)
        for start in range(0, len(self), SEARCH_BLOCK):
            scores = queries @ self.embeddings[start:start + SEARCH_BLOCK].T
            take = min(k, scores.shape[1])
            top = np.argpartition(-scores, take - 1, axis=1)[:, :take]
            best_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, 1)], axis=1)
            best_rows = np.concatenate([best_rows, top + start], axis=1)
            keep = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]
            best_scores, best_rows = (np.take_along_axis(a, keep, 1) for a in (best_scores, best_rows))
        return best_scores, best_rows


def list_images(image_dir: Path) -> list[Path]:
    return sorted(p for p in image_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _stat(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _previous(out: Path, fingerprint: str, quantize: int | None = None,
              max_num_patches: int | None = None) -> dict[str, tuple[dict, np.ndarray]]:
    """What an earlier build of `out` holds for this model, embedded as this build embeds (same
    --quantize, same NaFlex patch budget): path -> (entry, embedding)."""
    if not (out / INDEX_FILE).exists():
        return {}
    old = ImageIndex.load(out)
    # An index written before the budget was recorded reads as None: a square model's rows are
    # reused, a NaFlex model's (budget unknown) embedded again.
    if (old.meta.get("model_fingerprint") != fingerprint or old.meta.get("quantize") != quantize
            or old.meta.get("max_num_patches") != max_num_patches):
        return {}
    return {e["path"]: (e, row) for e, row in zip(old.entries, old.embeddings)}


def _write(out: Path, entries: list[dict], rows: list[np.ndarray], bad: list[tuple[str, str]], meta: dict,
           dim: int) -> None:
    """Embeddings first, then the JSON that names them (each by rename), so a reader never sees
    a JSON listing rows that are not there yet: `load` checks the counts agree. Rows by path."""
    out.mkdir(parents=True, exist_ok=True)
    kept = min(len(entries), len(rows))  # equal, but for a Ctrl-C between the two appends
    order = sorted(range(kept), key=lambda i: entries[i]["path"])
    entries, rows = [entries[i] for i in order], [rows[i] for i in order]
    embeddings = np.stack(rows).astype(np.float32) if rows else np.zeros((0, dim), np.float32)
    tmp = out / (EMBEDDINGS_FILE + ".tmp")
    save_file({"embeddings": embeddings}, str(tmp))
    os.replace(tmp, out / EMBEDDINGS_FILE)
    for name, text in ((BAD_FILE, "".join(f"{p}\t{why}\n" for p, why in bad)),
                       (INDEX_FILE, json.dumps({**meta, "files": entries, "bad_images": len(bad)}, indent=1))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)


def build_index(image_dir: str | Path, model: str | Path, out: str | Path, *, backend: str = "mlx",
                batch_size: int = 64, device: str | None = None, dtype: str | None = None,
                allow_pickle: bool = False, progress: bool = True, quantize: int | None = None,
                max_num_patches: int | None = None) -> IndexReport:
    """`max_num_patches`: NaFlex SigLIP 2's patch budget per image (default: the model folder's)."""
    from tqdm import tqdm

    from mlx_clip.api import load

    image_dir, out = Path(image_dir), Path(out)
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: no such folder of images")
    # The index may hold its image folder (a non-empty --out must be an index), never lie in it.
    refuse_overlap(out, {"the image folder": image_dir}, relations=("is", "is inside"))
    check_folder(out)  # before the model loads: an --out under a file or in /proc is one line
    if out.exists() and any(out.iterdir()) and not (out / INDEX_FILE).exists():
        raise ConfigError(f"--out {out} is a non-empty folder that is not an index; choose another")
    files = list_images(image_dir)
    if not files:
        raise DataError(f"{image_dir}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in it or below it")
    clip = load(model, backend, device=device, dtype=dtype, allow_pickle=allow_pickle, quantize=quantize,
                max_num_patches=max_num_patches)
    fingerprint = model_fingerprint(clip.folder)
    # Rows embedded with and without --quantize differ slightly, and a NaFlex image sized to another
    # patch budget is another input altogether: a rebuild reuses only rows embedded as it embeds.
    # The budget recorded is the one in effect (the folder's when none is given), so a rebuild
    # naming the folder's default reuses a build that named none.
    previous = _previous(out, fingerprint, quantize, clip.max_num_patches)
    meta = {"format": FORMAT, "version": VERSION, "model": str(model), "model_fingerprint": fingerprint,
            "quantize": quantize, "max_num_patches": clip.max_num_patches, "image_dir": str(image_dir.resolve()),
            "dim": clip.config.projection_dim}

    entries, rows, todo = [], [], []
    for path in files:
        rel = path.relative_to(image_dir).as_posix()
        entry = {"path": rel, **_stat(path)}
        old = previous.get(rel)
        if old is not None and (old[0]["size"], old[0]["mtime_ns"]) == (entry["size"], entry["mtime_ns"]):
            entries.append(entry)
            rows.append(old[1])
        else:
            todo.append((path, entry))
    reused = len(entries)
    removed = len(set(previous) - {p.relative_to(image_dir).as_posix() for p in files})
    bad: list[tuple[str, str]] = []
    bar = tqdm(total=len(todo), desc="embedding", unit="img", disable=not progress or not todo)
    dim = clip.config.projection_dim
    since_flush, flushed_at = 0, time.monotonic()
    try:
        with _interrupting_signals():
            for start in range(0, len(todo), batch_size):
                chunk, pixels, kept = todo[start:start + batch_size], [], []
                for path, entry in chunk:
                    why = _refused(path)
                    if why is not None:
                        bad.append((entry["path"], why))
                        continue
                    try:
                        pixels.append(clip.preprocess([path])[0])
                        kept.append(entry)
                    except ImageError as err:
                        bad.append((entry["path"], str(err).split(": ", 1)[-1]))
                if pixels:
                    embedded = clip.engine.encode_images(np.stack(pixels))
                    entries.extend(kept)
                    rows.extend(embedded)
                bar.update(len(chunk))
                since_flush += len(chunk)
                if since_flush >= FLUSH_EVERY or time.monotonic() - flushed_at >= FLUSH_SECONDS:
                    _write(out, entries, rows, bad, meta, dim)
                    since_flush, flushed_at = 0, time.monotonic()
    except KeyboardInterrupt:
        bar.close()
        _write(out, entries, rows, bad, meta, dim)
        raise IndexInterrupted(min(len(entries), len(rows)), len(files), out) from None
    bar.close()
    _write(out, entries, rows, bad, meta, dim)
    return IndexReport(len(entries), len(entries) - reused, reused, removed, bad, out)


@contextlib.contextmanager
def _interrupting_signals():
    """Ctrl-C and SIGTERM (`kill`, `timeout`, a container's stop) raise KeyboardInterrupt while the
    build runs, so either keeps what was embedded, as the trainer's checkpoint does; also where the
    process started with SIGINT ignored (a background job of a script), which Python would honour
    by never raising KeyboardInterrupt. Only the main thread may set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _refused(path: Path) -> str | None:
    """Why the server would refuse this file's bytes as an image, or None if it takes them."""
    try:
        with open(path, "rb") as handle:
            return refusal(handle.read(HEADER_BYTES))
    except OSError as err:
        return f"cannot read: {err.strerror or err}"
