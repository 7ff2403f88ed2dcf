"""CLIP's byte-level BPE tokenizer: OpenAI's 49,408-token vocabulary, 77-token context, no network.

Ids are those of OpenAI's `simple_tokenizer.py` (as open_clip ships it): text is cleaned in Python
exactly as there (ftfy, HTML unescaped twice, whitespace collapsed, lower-cased), then split and
BPE-merged by the Rust `tokenizers` library, whose BPE gives the same merges as the reference loop
at a fraction of the cost. Rows are `<|startoftext|> … <|endoftext|>` padded with `pad_id` (0, as
open_clip and OpenAI pad; transformers pads with `<|endoftext|>` instead). Padding never reaches
the model's output: attention is causal and pooling reads the first EOT.

Two deliberate departures from one reference or the other, both covered by tests:
- transformers does no ftfy / HTML cleaning (its normalizer is NFC + whitespace + lowercase), so
  mojibake, curly quotes, full-width letters, ligatures and `&amp;` tokenize differently there.
- open_clip renamed the special tokens `<start_of_text>`/`<end_of_text>` and matches those names in
  captions; we keep OpenAI's and transformers' names, so a literal `<|endoftext|>` in a caption is
  the EOT id (as in OpenAI's original and in transformers) and `<end_of_text>` is plain text.
"""

from __future__ import annotations

import functools
import gzip
import html
import json
from pathlib import Path

import ftfy
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from mlx_clip.errors import CheckpointError, ConfigError, DataError

CONTEXT_LENGTH = 77
PAD_ID = 0
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
DEFAULT_VOCAB_PATH = Path(__file__).parents[1] / "assets" / "bpe_simple_vocab_16e6.txt.gz"

# OpenAI's split pattern (simple_tokenizer.py); transformers uses the same one.
_SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# simple_tokenizer.py keeps merges[1 : 49152 - 256 - 2 + 1]: line 0 is a version header, and the
# vocabulary is 256 bytes x 2 (bare and word-final) + 48,894 merges + 2 special tokens = 49,408.
_NUM_MERGES = 49152 - 256 - 2
# (content, special) of the tokens matched verbatim in text before BPE.
_DEFAULT_ADDED = ((SOT_TOKEN, True), (EOT_TOKEN, True))
# What every vocabulary reader returns: token -> id, merges in rank order, added tokens.
_Parsed = tuple[dict[str, int], list[tuple[str, str]], tuple[tuple[str, bool], ...]]


# Texts up to this long are cached: captions and prompts are far shorter, while a server's texts
# (up to its --max-text-chars, 4096) would let 65,536 cached entries hold about half a gigabyte.
CACHED_TEXT_CHARS = 512


def clean_text(text: str) -> str:
    """OpenAI CLIP's `basic_clean` + `whitespace_clean` + lower-casing, in that order.

    Cached for short texts: training repeats captions every epoch (and class prompts far more
    often), and ftfy is ~70% of tokenizing time."""
    return _clean_cached(text) if len(text) <= CACHED_TEXT_CHARS else _clean(text)


def _clean(text: str) -> str:
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


_clean_cached = functools.lru_cache(maxsize=1 << 16)(_clean)


class CLIPTokenizer:
    """Text -> (B, context_length) int64 ids for a CLIP text tower.

    Build it with `from_pretrained_or_default` (cached per source); the constructor takes an
    already-validated vocabulary.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        *,
        added_tokens: tuple[tuple[str, bool], ...] = _DEFAULT_ADDED,
        pad_id: int = PAD_ID,
        source: str = str(DEFAULT_VOCAB_PATH),
    ) -> None:
        self._vocab = dict(vocab)
        self._merges = list(merges)
        self._added_tokens = added_tokens
        self.source = source
        self.sot_id = self._vocab[SOT_TOKEN]
        self.eot_id = self._vocab[EOT_TOKEN]
        self.pad_id = pad_id
        self.vocab_size = len(self._vocab)
        self._backend = _build_backend(self._vocab, self._merges, added_tokens, hf_pipeline=False)

    @classmethod
    def from_pretrained_or_default(cls, model_dir: str | Path | None = None) -> CLIPTokenizer:
        """The tokenizer files in `model_dir` if it holds any, else OpenAI's shipped vocabulary.

        `tokenizer.json` wins over `vocab.json` + `merges.txt`, as in transformers. A folder with
        weights only (no tokenizer files) gets the shipped vocabulary.
        """
        return load_tokenizer(model_dir)

    def encode(self, texts: str | list[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
        """(B, context_length) int64: SOT, tokens, EOT, then `pad_id`; EOT stays last when cut."""
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise ConfigError(f"context_length must be at least 2 (SOT + EOT), got {context_length}")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise DataError(f"caption {i} must be a string, got {type(text).__name__}: {text!r}")
        encodings = self._backend.encode_batch([clean_text(t) for t in texts], add_special_tokens=False)
        out = np.full((len(encodings), context_length), self.pad_id, dtype=np.int64)
        out[:, 0] = self.sot_id
        for row, encoding in zip(out, encodings):
            ids = encoding.ids[: context_length - 2]
            row[1 : 1 + len(ids)] = ids
            row[1 + len(ids)] = self.eot_id
        return out

    def token_counts(self, texts: list[str]) -> list[int]:
        """Tokens each text needs before `encode` cuts it, SOT and EOT included."""
        encodings = self._backend.encode_batch([clean_text(t) for t in texts], add_special_tokens=False)
        return [len(e.ids) + 2 for e in encodings]

    def __call__(self, texts: str | list[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
        return self.encode(texts, context_length)

    def trim(self, ids: np.ndarray) -> np.ndarray:
        """The ids as the engine takes them: the padding columns every row has are dropped
        (`trim_padding`; exact for CLIP). SigLIP's tokenizer keeps them."""
        return trim_padding(ids)

    def save_pretrained(self, directory: str | Path) -> list[Path]:
        """Write files `transformers.CLIPTokenizer.from_pretrained(directory)` loads to the same ids.

        Both layouts are written: `tokenizer.json` (what transformers 5 reads) and `vocab.json` +
        `merges.txt` (what transformers 4's slow tokenizer reads). transformers does no ftfy/HTML
        cleaning, so its ids equal ours on already-clean text.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        by_id = dict(sorted(self._vocab.items(), key=lambda item: item[1]))
        specials = {
            "bos_token": SOT_TOKEN,
            "eos_token": EOT_TOKEN,
            "unk_token": EOT_TOKEN,
            # Not "!" (id 0): transformers would then cut every "!" out of text as id 0 instead of
            # BPE-merging it ("wow!" -> 0, not 256). Its padded rows differ from ours only after EOT.
            "pad_token": EOT_TOKEN,
        }
        config = {
            "tokenizer_class": "CLIPTokenizer",
            **specials,
            "model_max_length": CONTEXT_LENGTH,
            "do_lower_case": True,
            "errors": "replace",
            "add_prefix_space": False,
        }
        files = {
            "vocab.json": json.dumps(by_id, ensure_ascii=False, indent=2) + "\n",
            "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self._merges),
            "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
            "special_tokens_map.json": json.dumps(specials, indent=2) + "\n",
        }
        written = []
        for name, text in files.items():
            (directory / name).write_text(text, encoding="utf-8")
            written.append(directory / name)
        hf = _build_backend(self._vocab, self._merges, self._added_tokens, hf_pipeline=True)
        hf.save(str(directory / "tokenizer.json"))
        written.append(directory / "tokenizer.json")
        return written


def load_tokenizer(model_dir: str | Path | None = None):
    """`CLIPTokenizer.from_pretrained_or_default`, cached while the files stay unchanged; for a
    SigLIP model folder, its own tokenizer (`siglip_tokenizer.SiglipTokenizer`, same methods)."""
    if model_dir is None:
        return _cached_load("gz", (_stamp(DEFAULT_VOCAB_PATH),))
    folder = Path(model_dir)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist or is not a directory")
    from mlx_clip.model.siglip_tokenizer import is_siglip_folder, load_siglip_tokenizer

    if is_siglip_folder(folder):
        return load_siglip_tokenizer(folder)
    tokenizer_json = folder / "tokenizer.json"
    vocab_json, merges_txt = folder / "vocab.json", folder / "merges.txt"
    if tokenizer_json.is_file():
        return _cached_load("tokenizer.json", (_stamp(tokenizer_json),))
    if vocab_json.is_file() and merges_txt.is_file():
        return _cached_load("vocab+merges", (_stamp(vocab_json), _stamp(merges_txt)))
    if vocab_json.is_file() or merges_txt.is_file():
        missing = merges_txt if vocab_json.is_file() else vocab_json
        raise CheckpointError(f"{missing} is missing: vocab.json and merges.txt only work together")
    return _cached_load("gz", (_stamp(DEFAULT_VOCAB_PATH),))


def _stamp(path: Path) -> tuple[str, int, int]:
    # The cache key carries size and mtime so a folder rewritten in place is read again.
    stat = path.stat()
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _cached_load(kind: str, stamps: tuple[tuple[str, int, int], ...]) -> CLIPTokenizer:
    paths = [Path(stamp[0]) for stamp in stamps]
    if kind == "gz":
        vocab, merges, added = _read_bpe_gz(paths[0])
    elif kind == "tokenizer.json":
        vocab, merges, added = _read_tokenizer_json(paths[0])
    else:
        vocab, merges, added = _read_vocab_merges(paths[0], paths[1])
    source = " + ".join(str(p) for p in paths)
    _check_vocab(vocab, merges, source)
    try:
        return CLIPTokenizer(vocab, merges, added_tokens=added, source=source)
    except Exception as err:  # tokenizers reports bad merges as a bare Exception
        raise CheckpointError(f"{source}: not a usable BPE vocabulary ({err})") from err


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-character table (OpenAI CLIP simple_tokenizer.bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    shift = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + shift)
            shift += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


def _read_bpe_gz(path: Path) -> _Parsed:
    try:
        lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read the gzipped BPE merges ({err})") from err
    merges = [_parse_merge(line, path, n) for n, line in enumerate(lines[1 : _NUM_MERGES + 1], start=2)]
    if len(merges) != _NUM_MERGES:
        raise CheckpointError(f"{path}: expected {_NUM_MERGES} merges, found {len(merges)}")
    # Same order as simple_tokenizer.py, which fixes the ids: bytes, word-final bytes, merges, specials.
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + [a + b for a, b in merges] + [SOT_TOKEN, EOT_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, merges, _DEFAULT_ADDED


def _read_tokenizer_json(path: Path) -> _Parsed:
    data = _read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise CheckpointError(f"{path}: expected a BPE tokenizer ('model.type' == 'BPE')")
    if model.get("end_of_word_suffix") != END_OF_WORD:
        raise CheckpointError(
            f"{path}: not a CLIP tokenizer (end_of_word_suffix must be {END_OF_WORD!r}, "
            f"got {model.get('end_of_word_suffix')!r})"
        )
    vocab = _check_vocab_dict(model.get("vocab"), path)
    raw_merges = model.get("merges")
    if not isinstance(raw_merges, list):
        raise CheckpointError(f"{path}: 'model.merges' must be a list")
    # Older tokenizers write "a b" strings, newer ones [a, b] pairs.
    merges = [
        _parse_merge(m, path, i) if isinstance(m, str) else _pair(m, path, i) for i, m in enumerate(raw_merges)
    ]
    added = []
    for entry in data.get("added_tokens") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise CheckpointError(f"{path}: malformed entry in 'added_tokens': {entry!r}")
        content, token_id = entry["content"], entry.get("id")
        if not isinstance(token_id, int) or isinstance(token_id, bool):
            raise CheckpointError(f"{path}: added token {content!r} has no integer id")
        if vocab.setdefault(content, token_id) != token_id:
            raise CheckpointError(f"{path}: added token {content!r} has id {token_id}, vocab says {vocab[content]}")
        added.append((content, bool(entry.get("special", False))))
    return vocab, merges, tuple(added) or _DEFAULT_ADDED


def _read_vocab_merges(vocab_path: Path, merges_path: Path) -> _Parsed:
    vocab = _check_vocab_dict(_read_json(vocab_path), vocab_path)
    try:
        lines = merges_path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{merges_path}: cannot read ({err})") from err
    merges = [
        _parse_merge(line, merges_path, n)
        for n, line in enumerate(lines, start=1)
        if line.strip() and not (n == 1 and line.startswith("#version"))
    ]
    return vocab, merges, _DEFAULT_ADDED


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err


def _check_vocab_dict(vocab: object, path: Path) -> dict[str, int]:
    if not isinstance(vocab, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in vocab.items()
    ):
        raise CheckpointError(f"{path}: the vocabulary must be a JSON object of token -> integer id")
    return dict(vocab)


def _parse_merge(line: str, path: Path, line_no: int) -> tuple[str, str]:
    parts = line.split()
    if len(parts) != 2:
        raise CheckpointError(f"{path}: merge {line_no} must be two symbols separated by a space, got {line!r}")
    return parts[0], parts[1]


def _pair(merge: object, path: Path, index: int) -> tuple[str, str]:
    if not (isinstance(merge, list) and len(merge) == 2 and all(isinstance(s, str) for s in merge)):
        raise CheckpointError(f"{path}: merge {index} must be a pair of strings, got {merge!r}")
    return merge[0], merge[1]


def _check_vocab(vocab: dict[str, int], merges: list[tuple[str, str]], source: str) -> None:
    for token in (SOT_TOKEN, EOT_TOKEN):
        if token not in vocab:
            raise CheckpointError(f"{source}: the vocabulary lacks CLIP's special token {token}")
    # Every byte, bare and word-final, must be a token, or some text would have no ids at all.
    missing = [s for c in _bytes_to_unicode().values() for s in (c, c + END_OF_WORD) if s not in vocab]
    if missing:
        raise CheckpointError(f"{source}: the vocabulary lacks {len(missing)} byte tokens, e.g. {missing[0]!r}")
    if len(set(vocab.values())) != len(vocab):
        raise CheckpointError(f"{source}: two tokens share one id")
    for a, b in merges:
        if a + b not in vocab:
            raise CheckpointError(f"{source}: merge {a!r} {b!r} makes {a + b!r}, which is not in the vocabulary")


def _build_backend(
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    added_tokens: tuple[tuple[str, bool], ...],
    *,
    hf_pipeline: bool,
) -> Tokenizer:
    """The BPE model; with `hf_pipeline`, wrapped exactly as `transformers.CLIPTokenizer` wraps it.

    Without it there is no normalizer: `clean_text` has already done NFC (ftfy), whitespace and
    lower-casing the way OpenAI does, and a second pass could only drift from it.
    """
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix=END_OF_WORD,
            fuse_unk=False,
            unk_token=EOT_TOKEN,
        )
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    # AddedToken contents are matched in the text before splitting, as OpenAI's pattern does.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, s in added_tokens if s])
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t, s in added_tokens if not s])
    if hf_pipeline:
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.post_processor = processors.RobertaProcessing(
            (EOT_TOKEN, vocab[EOT_TOKEN]), (SOT_TOKEN, vocab[SOT_TOKEN]), trim_offsets=False, add_prefix_space=False
        )
    return tokenizer


def trim_padding(ids: np.ndarray, multiple: int = 8) -> np.ndarray:
    """Drop the padding columns every row has, keeping a multiple of `multiple` tokens.

    Exact for CLIP: attention is causal and pooling reads the EOT, so nothing after a row's EOT
    reaches its embedding. Text cost falls from 77 positions to the batch's longest caption; the
    length is rounded up so a compiled step sees only a few distinct shapes."""
    used = np.flatnonzero((ids != PAD_ID).any(axis=0))
    length = int(used[-1]) + 1 if used.size else 1
    length = min(ids.shape[1], -(-length // multiple) * multiple)
    return ids[:, :length]
