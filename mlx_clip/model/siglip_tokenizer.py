"""SigLIP's tokenizer: the model folder's own `tokenizer.json`, run by the Rust `tokenizers`
library (SentencePiece models included, as Hugging Face serialises them), no network.

Rows are padded to the text tower's full length (`max_position_embeddings`, 64 for
google/siglip-*), as `SiglipProcessor(..., padding="max_length", truncation=True)` gives them:
SigLIP was trained on full-length rows and pools the *last* position, so padding is part of the
input and is never trimmed. Normalisation (lower-casing, punctuation), the pre-tokenizer and the
end-of-text token are whatever the file declares, so the ids equal `transformers.AutoTokenizer`'s
on the same folder (a test holds them to it); the pad token comes from the folder's
`tokenizer_config.json` / `special_tokens_map.json` as transformers reads it.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from mlx_clip.errors import CheckpointError, ConfigError, DataError

TOKENIZER_JSON = "tokenizer.json"
SPECIAL_FILES = ("tokenizer_config.json", "special_tokens_map.json")
OPEN_CLIP_CONFIG = "open_clip_config.json"


class SiglipTokenizer:
    """Text -> (B, context_length) int64 ids, padded to the full length with `pad_id`."""

    def __init__(self, tokenizer: Tokenizer, *, context_length: int, pad_id: int, source: str) -> None:
        self._tokenizer = tokenizer
        self.context_length = context_length
        self.pad_id = pad_id
        self.source = source
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: str | list[str], context_length: int | None = None) -> np.ndarray:
        """(B, L) int64, L = `context_length` (the model's by default): tokens, the file's special
        tokens, cut to L (as transformers' `truncation=True`) and padded to L."""
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        if length < 1:
            raise ConfigError(f"context_length must be at least 1, got {length}")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise DataError(f"caption {i} must be a string, got {type(text).__name__}: {text!r}")
        out = np.full((len(texts), length), self.pad_id, dtype=np.int64)
        for row, encoding in zip(out, self._backend(length).encode_batch(list(texts))):
            ids = encoding.ids[:length]
            row[: len(ids)] = ids
        return out

    def token_counts(self, texts: list[str]) -> list[int]:
        """Tokens each text needs before `encode` cuts it, special tokens included."""
        return [len(e.ids) for e in self._tokenizer.encode_batch(list(texts))]

    def trim(self, ids: np.ndarray) -> np.ndarray:
        """The ids as the engine takes them: SigLIP keeps every padding column (see the module)."""
        return ids

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> np.ndarray:
        return self.encode(texts, context_length)

    @functools.lru_cache(maxsize=4)
    def _backend(self, length: int) -> Tokenizer:
        tokenizer = Tokenizer.from_str(self._tokenizer.to_str())
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=length)
        return tokenizer


def is_siglip_folder(folder: Path) -> bool:
    """Whether `folder`'s config.json names the SigLIP family (model_type "siglip" or "siglip2"), or, without a
    config.json, its open_clip_config.json builds the image tower from timm (open_clip's SigLIP)."""
    path = folder / "config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8")).get("model_type") in ("siglip", "siglip2")
        except (OSError, ValueError, AttributeError):
            return False  # the config reader reports a broken config.json with its own message
    vision = _open_clip_model_cfg(folder).get("vision_cfg")
    return isinstance(vision, dict) and bool(vision.get("timm_model_name"))


def _open_clip_model_cfg(folder: Path) -> dict:
    try:
        data = json.loads((folder / OPEN_CLIP_CONFIG).read_text(encoding="utf-8"))
        model_cfg = data.get("model_cfg")
    except (OSError, ValueError, AttributeError):
        return {}
    return model_cfg if isinstance(model_cfg, dict) else {}


def _open_clip_text_cfg(folder: Path) -> dict:
    text = _open_clip_model_cfg(folder).get("text_cfg")
    return text if isinstance(text, dict) else {}


def _tokenizer_repo(folder: Path) -> str | None:
    """The hub repository open_clip's SigLIP reads its tokenizer from (`text_cfg.hf_tokenizer_name`),
    from the folder's open_clip_config.json or the copy a converted config.json keeps."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        text = ((config.get("open_clip_config") or {}).get("model_cfg") or {}).get("text_cfg") or {}
    except (OSError, ValueError, AttributeError):
        text = _open_clip_text_cfg(folder)
    name = text.get("hf_tokenizer_name") if isinstance(text, dict) else None
    return name if isinstance(name, str) else None


def load_siglip_tokenizer(folder: str | Path) -> SiglipTokenizer:
    """The tokenizer of a SigLIP model folder (cached while its files stay unchanged)."""
    folder = Path(folder)
    path = folder / TOKENIZER_JSON
    if not path.is_file():
        hint = ""
        repo = _tokenizer_repo(folder)
        if (folder / "spiece.model").is_file():
            # transformers has no slow-to-fast converter for SigLIP's SentencePiece model (5.x writes
            # spiece.model back, no tokenizer.json), so no one-line conversion can be offered.
            hint = (" (it has only the SentencePiece spiece.model; mlxclip reads a SigLIP tokenizer from its "
                    "tokenizer.json, as the hub repositories of SigLIP 2 ship it)")
        elif repo:
            hint = (f" (open_clip reads this model's tokenizer from the hub repository {repo!r}, "
                    "text_cfg.hf_tokenizer_name: copy its tokenizer.json and tokenizer_config.json here)")
        raise CheckpointError(f"{path}: file not found; a SigLIP model folder needs its tokenizer.json{hint}")
    stamps = tuple((str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size)
                   for p in (path, *(folder / n for n in SPECIAL_FILES), folder / "config.json",
                             folder / OPEN_CLIP_CONFIG) if p.is_file())
    return _cached(stamps)


@functools.lru_cache(maxsize=8)
def _cached(stamps: tuple[tuple[str, int, int], ...]) -> SiglipTokenizer:
    paths = {Path(s[0]).name: Path(s[0]) for s in stamps}
    path = paths[TOKENIZER_JSON]
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on a malformed file
        raise CheckpointError(f"{path}: not a tokenizer.json the tokenizers library reads ({err})") from None
    config = _read_json(paths.get("config.json"))
    text = config.get("text_config") or {}
    context = text.get("max_position_embeddings", 64)
    if "config.json" not in paths and OPEN_CLIP_CONFIG in paths:  # an open_clip SigLIP folder
        context = _open_clip_text_cfg(paths[OPEN_CLIP_CONFIG].parent).get("context_length", context)
    specials = {**_read_json(paths.get("special_tokens_map.json")), **_read_json(paths.get("tokenizer_config.json"))}
    pad_id = _pad_id(tokenizer, specials, text, path)
    return SiglipTokenizer(tokenizer, context_length=int(context), pad_id=pad_id, source=str(path))


def _read_json(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    return data if isinstance(data, dict) else {}


def _pad_id(tokenizer: Tokenizer, specials: dict, text_config: dict, path: Path) -> int:
    """transformers' order: the pad token the tokenizer files name, then the padding tokenizer.json
    carries, then the model config's pad_token_id."""
    pad = specials.get("pad_token")
    if isinstance(pad, dict):
        pad = pad.get("content")
    if isinstance(pad, str):
        token_id = tokenizer.token_to_id(pad)
        if token_id is None:
            raise CheckpointError(f"{path}: the pad token {pad!r} is not in the vocabulary")
        return token_id
    if tokenizer.padding is not None:
        return int(tokenizer.padding["pad_id"])
    if isinstance(text_config.get("pad_token_id"), int):
        return text_config["pad_token_id"]
    raise CheckpointError(f"{path}: no pad token (tokenizer_config.json, tokenizer.json or pad_token_id)")
