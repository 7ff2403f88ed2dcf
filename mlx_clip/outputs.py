"""Where a command may write. Checked before any work is done, so a refusal costs nothing:

- an output folder or file that cannot be created is one error naming it, not an OSError from
  the middle of a run;
- no output may be, contain or lie inside an input of the same command. `--overwrite` replaces
  what the output path holds, so an overlap would delete the very model or data being read
  (`mlxclip convert SRC PARENT_OF_SRC --overwrite` once removed SRC and its neighbours).
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from mlx_clip.errors import ConfigError


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def overlap(out: str | Path, other: str | Path) -> str | None:
    """How `out` and `other` overlap on disk ('is', 'contains', 'is inside'), or None."""
    a, b = _resolved(out), _resolved(other)
    if a == b:
        return "is"
    if a in b.parents:
        return "contains"
    if b in a.parents:
        return "is inside"
    return None


def refuse_overlap(out: str | Path, inputs: Mapping[str, str | Path | None] | Iterable[tuple[str, str | Path | None]],
                   *, option: str = "--out", relations: tuple[str, ...] = ("is", "contains", "is inside")) -> None:
    """ConfigError if `out` is, contains or lies inside one of `inputs` (name -> path; names are
    what the user typed, e.g. "--data"). Inputs that are not local paths (built-in names, hub
    ids, None) are skipped. `relations` narrows the check for commands that only add files (a
    report may go into a folder that holds its data, never into the data or over them)."""
    for name, path in (inputs.items() if isinstance(inputs, Mapping) else inputs):
        if path is None or not Path(path).expanduser().exists():
            continue
        relation = overlap(out, path)
        if relation in relations:
            raise ConfigError(f"{option} {out} {relation} {name} {path}; an output never replaces or mixes into an "
                              "input of the same command: choose a path apart from it")


def check_folder(path: str | Path, *, option: str = "--out") -> Path:
    """ConfigError naming `path` unless it is, or can become, a writable folder. Leaves nothing
    behind: a run folder appears only once the run can start (a refused run left one that the
    retry then took for a run)."""
    path = Path(path).expanduser()
    missing = []
    existing = path
    while not existing.exists() and existing != existing.parent:
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        where = "exists and is not a folder" if existing == path else f"{existing} is not a folder"
        raise ConfigError(f"{option} {path}: {where}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.TemporaryFile(dir=path)  # as root os.access says yes even on a read-only mount
        probe.close()
    except OSError as err:
        raise ConfigError(f"{option} {path}: cannot write there ({err.strerror or err})") from None
    finally:
        for folder in missing:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                pass
    return path


def check_file(path: str | Path, *, option: str = "--out") -> Path:
    """ConfigError naming `path` unless a file can be written there (its folder is created later,
    by the writer)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"{option} {path}: is a folder; give a file path")
    check_folder(path.parent, option=f"{option} {path}: its folder")
    return path


def staging_folder(dst: Path) -> Path:
    """A new hidden sibling of `dst` to write into; renamed over `dst` only once verified."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = dst.parent / f".{dst.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    return staging


def move_into_place(staging: Path, dst: Path) -> None:
    """Rename `staging` to `dst`, replacing an existing `dst` only once the new one is there."""
    if not dst.exists():
        staging.rename(dst)
        return
    # Keep the old folder until the new one is in place, so no failure leaves neither.
    old = dst.parent / f".{dst.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    dst.rename(old)
    try:
        staging.rename(dst)
    except OSError:
        old.rename(dst)
        raise
    shutil.rmtree(old, ignore_errors=True)
