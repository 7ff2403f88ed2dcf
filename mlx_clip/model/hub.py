"""Resolve `--model`: a local folder, a built-in name, or a Hugging Face hub id.

Hub downloads go through huggingface_hub (its cache, `HF_HUB_OFFLINE`, tokens), and fetch only
what loading needs: configs, safetensors, tokenizer and preprocessor files. Pickled `*.bin` weights
are fetched only when the user allows pickle, and even then are read with `weights_only=True`.
"""

from __future__ import annotations

import re
from pathlib import Path

from mlx_clip.errors import CheckpointError

SAFE_PATTERNS = [
    "config.json", "open_clip_config.json", "*.safetensors", "*.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "special_tokens_map.json", "preprocessor_config.json",
]
PICKLE_PATTERNS = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin",
                   "open_clip_pytorch_model.bin"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class _Never(Exception):
    """Stands in for an exception type the installed huggingface_hub does not define."""


def looks_local(text: str) -> bool:
    """A name meant as a path, never to be asked of the hub: absolute, relative to `.`/`~`, or
    `dir/name` where `dir` exists here (`runs/mine` mistyped is a missing folder, not a hub id)."""
    if text.startswith((".", "/", "~")) or "\\" in text:
        return True
    parent = Path(text).expanduser().parent
    return parent != Path(".") and parent.is_dir()


def resolve_model(name: str | Path, *, allow_pickle: bool = False, revision: str | None = None,
                  cache_dir: str | Path | None = None) -> Path:
    """Return a local folder holding the model `name` names."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected a model folder (config.json + weights), got a file")
        return path
    text = str(name)
    if looks_local(text):
        raise CheckpointError(f"{text}: no such folder")
    if not _HUB_ID.match(text):
        raise CheckpointError(f"{text}: no such folder, and not a hub id of the form org/name")
    try:
        from huggingface_hub import errors as hub_errors, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError(f"{text}: huggingface_hub is not installed, cannot fetch hub ids") from None
    # Releases without a cached tree listing cannot tell an incomplete snapshot, so never raise it.
    IncompleteSnapshotError = getattr(hub_errors, "IncompleteSnapshotError", _Never)
    # Offline, huggingface_hub returns the cached snapshot as is (a `*.bin` already there stays);
    # the patterns still decide which files it requires. Pickles are then refused by the reader.
    patterns = SAFE_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    try:
        folder = snapshot_download(text, revision=revision, cache_dir=cache_dir, allow_patterns=patterns)
    except IncompleteSnapshotError as err:
        missing = re.search(r"missing \(([^)]*)\)", str(err))
        raise CheckpointError(f"{text}: the cached snapshot {err.snapshot_path} lacks files this load needs"
                              + (f" ({missing.group(1)})" if missing else "")
                              + " and the hub cannot be reached; fetch it again with network access") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{text}: not in the local Hugging Face cache and the hub cannot be "
                              "reached (HF_HUB_OFFLINE is set or there is no network)") from None
    except HfHubHTTPError as err:
        raise CheckpointError(f"{text}: hub request failed ({err.__class__.__name__}: "
                              f"{str(err).splitlines()[0]})") from None
    except Exception as err:  # network stacks raise many types; the user needs one line
        raise CheckpointError(f"{text}: could not fetch from the hub ({err.__class__.__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None
    return Path(folder)
