"""The CLIP tokenizer against open_clip's SimpleTokenizer (OpenAI's code) and transformers.CLIPTokenizer.

Ids must be identical (exact integer equality, no tolerance). The two references disagree with
each other on a few strings; those are listed below with the reason, and the tests assert that the
strings on which we differ from a reference are exactly the listed ones.
"""

import mlx_clip  # noqa: F401  (first, by house rule)

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest
import transformers
from open_clip import tokenizer as oc_tok

from mlx_clip.errors import CheckpointError, ConfigError, DataError
from mlx_clip.model.tokenizer import DEFAULT_VOCAB_PATH, CLIPTokenizer, load_tokenizer

CTX = 77

PLAIN = [
    "",
    "   ",
    "\n\t \n",
    "a photo of a cat",
    "A photo of a DOG.",
    "It's a dog's life; they're here, we've been, I'm sure, you'll see, he'd go. IT'S LOUD",
    "'s 't 're ''s '''",
    "The year 2024: 3.14159 x 10^5 = 314,159 items!!!",
    "3.5mm 10km/h 1/2 ½ ² ³ ① 100% $100 €50 £3 ¥7",
    "1234567890 0.000001 -42 +7 1e10",
    "café naïve résumé Ångström façade Þór smørrebrød ŁÓDŹ",
    "e\u0301 a\u0300 n\u0303 (decomposed accents, NFC composes them)",
    "東京の猫の写真",
    "一只猫的照片在桌子上。",
    "고양이 사진",
    "фото кошки на диване",
    "صورة قطة",
    "תמונה של חתול",
    "बिल्ली की तस्वीर",
    "ภาพแมวบนโต๊ะ",
    "Ελληνικά γράμματα: αβγ ΑΒΓ",
    "a cat 🐱 and a dog 🐶!!",
    "family 👨‍👩‍👧‍👦 with flags 🇫🇷🇯🇵, skin tone 👍🏽 and ❤️",
    "multiple     spaces\n\n\nand\t\ttabs  and\r\nwindows newlines  ",
    "non\u00a0breaking\u2003em\u3000ideographic spaces",
    "zero\u200bwidth joiner\u200d",
    "@user #hashtag a+b=c (x) [y] {z} <tag> \\back/slash | pipe ~tilde `tick` ^caret _under_",
    "https://example.com/path_to/file.jpg?size=large#top",
    "?!?!... ---- ****  ,,,, ;;;",
    "MiXeD CaSe WoRdS And ALLCAPS",
    "İstanbul ß ẞ straße",
    " ".join(["word"] * 200),
    "a" * 500,
    "supercalifragilisticexpialidocious " * 20,
    "東京" * 120,
    "🐱" * 100,
    " ".join(str(i) for i in range(100)),
    "<start_of_text and <end_of_text without the closing bracket",
]

# transformers normalizes with NFC + whitespace + lowercase only; OpenAI's cleaning also runs ftfy
# and unescapes HTML twice, so these differ there. We follow OpenAI (= open_clip).
HF_DIFFERS = {
    "Tom &amp; Jerry": "HTML entity",
    "5 &lt; 6 &gt; 4 &quot;quoted&quot; caf&eacute;": "HTML entities",
    "&amp;amp;lt;b&amp;amp;gt; double escaped": "HTML unescaped twice",
    "it&#39;s &#x27;hex&#x27;": "numeric entities",
    "<b>bold</b> &amp; more": "entity next to markup",
    "https://example.com/?a=1&copy=2": "'&copy' is an HTML5 entity without ';'",
    "it’s “smart” ‘quotes’": "ftfy uncurls quotes",
    "Don’t STOP": "ftfy uncurls quotes",
    "ＦＵＬＬＷＩＤＴＨ　ｔｅｘｔ １２３": "ftfy folds full-width forms",
    "ﬁsh ﬂy ﬀ": "ftfy expands ligatures",
    "一只猫，一只狗！": "ftfy folds full-width punctuation",
    "ǅ digraph": "ftfy expands the digraph",
    "cafÃ© mojibake â€œquoteâ€\x9d": "ftfy fixes mojibake",
    "\x1b[31mred\x1b[0m terminal": "ftfy strips terminal escapes",
    "bell\x07 and nul\x00 controls": "ftfy strips control characters",
    "next\x85line C1": "ftfy reads C1 controls as Windows-1252",
    "ΟΔΟΣ ΣΟΦΟΣ": "Python's lower() has the final-sigma rule, tokenizers' Lowercase does not",
    "hello <|ENDOFTEXT|> world": "special-token literal in upper case: matched after lower-casing (OpenAI)",
}

# open_clip renamed OpenAI's special tokens to <start_of_text>/<end_of_text> and matches those names
# in text; OpenAI's original and transformers match <|startoftext|>/<|endoftext|>, as we do.
OPEN_CLIP_DIFFERS = {
    "<|startoftext|>hello<|endoftext|>": "OpenAI special-token literals",
    "x <|endoftext|> y": "OpenAI special-token literal",
    "hello <|ENDOFTEXT|> world": "OpenAI special-token literal (lower-cased)",
    "<start_of_text> open_clip names <end_of_text>": "open_clip-only special-token names",
}

# Building blocks for random strings: none is changed by ftfy, HTML unescaping or lower-casing
# differences (no '&', curly quotes, full-width forms, capital sigma), so every random string must
# match both references exactly. Latin-1 symbols (U+00A0-U+00BF, x, NBSP) and Windows-1252 extras
# (euro, bullet, dashes, oe) are left out too: next to an accented letter they read as UTF-8
# mojibake, which ftfy "repairs" (e.g. "×²" -> "ײ"); the hand-written strings cover them alone.
_SCRIPTS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789",
    "!\"#$%'()*+,-./:;<=>?@[\\]^_`{|}~",
    "éèêëàâäçñøåæßÉÀÇÑÜÖüöïîôûÿąęłńśźżčřőű",
    "αβγδεζηθλμπρστφχψωΑΒΓΔΘΛΠΦΨΩάέή",
    "абвгдежзиклмнопрстуфхцчшщыэюяАБВГДЖЗИЙКЛМНё",
    "猫犬写真東京山川日本語中文漢字的了是在有",
    "ねこのしゃしんカタカナひらがなー",
    "고양이사진한국어강아지",
    "قطةصورةكلب",
    "חתולתמונהכלב",
    "ภาพแมวสุนัข",
    "∑√∞≈≠≤≥→←↑★☆♪♥✓⌘",
]
_EMOJI = ["🐱", "🐶", "👍🏽", "🎉", "🚀", "❤️", "👨‍👩‍👧", "🇫🇷", "🌍", "😀"]
_SEPARATORS = [" ", " ", " ", "  ", "\n", "\t", ", ", ". ", " - ", "\u2003", "\r\n", "'s "]


def _random_string(rng: random.Random) -> str:
    n_words = rng.choice([0, 1, 2, 3, 5, 8, 12, 20, 40, 90])
    parts = []
    for _ in range(n_words):
        if rng.random() < 0.1:
            word = "".join(rng.choices(_EMOJI, k=rng.randint(1, 3)))
        elif rng.random() < 0.75:
            word = "".join(rng.choices(rng.choice(_SCRIPTS), k=rng.randint(1, 10)))
        else:
            word = "".join(rng.choice(rng.choice(_SCRIPTS)) for _ in range(rng.randint(1, 10)))
        parts.append(word + rng.choice(_SEPARATORS))
    return "".join(parts)


RANDOM = [_random_string(random.Random(seed)) for seed in range(240)]
CORPUS = list(dict.fromkeys(PLAIN + list(HF_DIFFERS) + list(OPEN_CLIP_DIFFERS) + RANDOM))


@pytest.fixture(scope="module")
def ours() -> CLIPTokenizer:
    return load_tokenizer()


@pytest.fixture(scope="module")
def open_clip_ref() -> oc_tok.SimpleTokenizer:
    return oc_tok.SimpleTokenizer(bpe_path=str(DEFAULT_VOCAB_PATH))


@pytest.fixture(scope="module")
def hf_ref(open_clip_ref) -> transformers.CLIPTokenizer:
    # The vocabulary as open_clip derives it from the same gz file, under OpenAI's token names.
    names = {open_clip_ref.sot_token_id: "<|startoftext|>", open_clip_ref.eot_token_id: "<|endoftext|>"}
    vocab = {names.get(i, token): i for token, i in open_clip_ref.encoder.items()}
    merges = sorted(open_clip_ref.bpe_ranks, key=open_clip_ref.bpe_ranks.get)
    tok = transformers.CLIPTokenizer(vocab=vocab, merges=merges)
    # transformers 5 silently ignores v4's vocab_file=/merges_file= and builds a 3-token vocab.
    assert len(tok) == 49408
    return tok


def _hf_rows(tok, texts: list[str], ctx: int = CTX) -> np.ndarray:
    """transformers ids, truncated to ctx, padded with 0 (transformers pads with its pad token)."""
    out = np.zeros((len(texts), ctx), dtype=np.int64)
    for row, ids in zip(out, tok(texts, truncation=True, max_length=ctx)["input_ids"]):
        row[: len(ids)] = ids
    return out


def _ref_clean(text: str) -> str:
    return oc_tok.whitespace_clean(oc_tok.basic_clean(text)).lower()


def _differing(a: np.ndarray, b: np.ndarray, texts: list[str]) -> set[str]:
    return {t for t, ra, rb in zip(texts, a, b) if not np.array_equal(ra, rb)}


def test_corpus_is_large_and_varied():
    assert len(CORPUS) >= 250
    assert any(len(t) > 600 for t in CORPUS)
    assert sum(t == "" for t in RANDOM) > 0


def test_shipped_vocabulary_is_open_clips(ours, open_clip_ref):
    shipped = Path(oc_tok.default_bpe()).read_bytes()
    assert DEFAULT_VOCAB_PATH.read_bytes() == shipped
    assert ours.vocab_size == open_clip_ref.vocab_size == 49408
    assert (ours.sot_id, ours.eot_id, ours.pad_id) == (49406, 49407, 0)
    assert (ours.sot_id, ours.eot_id) == (open_clip_ref.sot_token_id, open_clip_ref.eot_token_id)


def test_matches_open_clip(ours, open_clip_ref):
    got = ours.encode(CORPUS)
    want = open_clip_ref(CORPUS, context_length=CTX).numpy()
    assert got.dtype == np.int64 and got.shape == (len(CORPUS), CTX)
    assert _differing(got, want, CORPUS) == set(OPEN_CLIP_DIFFERS)
    special_names = ("<|startoftext|>", "<|endoftext|>", "<start_of_text>", "<end_of_text>")
    assert all(any(n in t.lower() for n in special_names) for t in OPEN_CLIP_DIFFERS)


def test_matches_transformers(ours, hf_ref):
    got = ours.encode(CORPUS)
    assert _differing(got, _hf_rows(hf_ref, CORPUS), CORPUS) == set(HF_DIFFERS)
    # The whole difference is OpenAI's text cleaning: on cleaned text transformers agrees everywhere.
    cleaned = [_ref_clean(t) for t in CORPUS]
    np.testing.assert_array_equal(got, _hf_rows(hf_ref, cleaned))


def test_truncation_keeps_eot_last(ours, open_clip_ref, hf_ref):
    long = [t for t in CORPUS if len(open_clip_ref.encode(t)) > CTX - 2]
    assert len(long) >= 20
    rows = ours.encode(long)
    assert (rows[:, 0] == 49406).all() and (rows[:, -1] == 49407).all()
    for ctx in (2, 8, 16):
        small = ours.encode(CORPUS, context_length=ctx)
        want = open_clip_ref(CORPUS, context_length=ctx).numpy()
        assert _differing(small, want, CORPUS) <= set(OPEN_CLIP_DIFFERS)


def test_empty_and_single_string(ours):
    np.testing.assert_array_equal(ours.encode(""), [[49406, 49407] + [0] * (CTX - 2)])
    np.testing.assert_array_equal(ours.encode("a photo of a cat"), ours.encode(["a photo of a cat"]))
    assert ours.encode([]).shape == (0, CTX)


def test_bad_arguments(ours):
    with pytest.raises(ConfigError, match="context_length"):
        ours.encode("a", context_length=1)
    with pytest.raises(DataError, match="caption 1"):
        ours.encode(["a", None])


_CAPTION_WORDS = (
    "a photo of the small large red blue dog cat car tree house beach café naïve crème brûlée "
    "on in at near under with two three 2024 x-ray city street mountain 東京 猫 🐱 🐶 night's sunny"
).split()


def test_a_batch_of_1000_equals_one_by_one(ours):
    """Batch encoding (the fast path, timed by `python -m mlx_clip.benchmarks.timings`) is row for row the same
    as encoding each caption alone."""
    rng = random.Random(1234)
    captions = [" ".join(rng.choices(_CAPTION_WORDS, k=rng.randint(6, 20))) + "." for _ in range(1000)]
    rows = ours.encode(captions)
    assert rows.shape == (1000, CTX)
    for i in range(0, 1000, 37):
        np.testing.assert_array_equal(rows[i], ours.encode(captions[i])[0])


def test_cached(ours):
    assert load_tokenizer() is ours
    assert CLIPTokenizer.from_pretrained_or_default(None) is ours


def test_weights_only_folder_gets_shipped_vocab(tmp_path, ours):
    (tmp_path / "config.json").write_text("{}")
    assert load_tokenizer(tmp_path) is ours


def test_folder_written_by_transformers(tmp_path, ours, hf_ref):
    hf_ref.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = CLIPTokenizer.from_pretrained_or_default(tmp_path)
    assert loaded.source.endswith("tokenizer.json")
    np.testing.assert_array_equal(loaded.encode(CORPUS), ours.encode(CORPUS))


def _tiny_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A different BPE vocabulary, so a test can tell a folder's files from the shipped ones."""
    symbols = list(oc_tok.bytes_to_unicode().values())
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


TINY_TEXTS = ["a cat and a dog", "CAT DOG cats dogs", "", "x <|endoftext|> y", "猫 🐱 ok"]


def test_folder_tokenizer_json_is_used(tmp_path, ours):
    vocab, merges = _tiny_vocab()
    hf = transformers.CLIPTokenizer(vocab=vocab, merges=merges)
    assert len(hf) == len(vocab) == 518
    hf.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert (loaded.vocab_size, loaded.sot_id, loaded.eot_id) == (518, 516, 517)
    np.testing.assert_array_equal(loaded.encode(TINY_TEXTS), _hf_rows(hf, TINY_TEXTS))
    assert not np.array_equal(loaded.encode(TINY_TEXTS), ours.encode(TINY_TEXTS))


def test_folder_vocab_json_and_merges_txt(tmp_path):
    # transformers 4's save_pretrained layout (and the openai/clip-* hub repos).
    vocab, merges = _tiny_vocab()
    (tmp_path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    hf = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    assert len(hf) == 518
    loaded = load_tokenizer(tmp_path)
    assert loaded.source.endswith("merges.txt")
    np.testing.assert_array_equal(loaded.encode(TINY_TEXTS), _hf_rows(hf, TINY_TEXTS))


def test_rewritten_folder_is_read_again(tmp_path, ours):
    vocab, merges = _tiny_vocab()
    transformers.CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path).vocab_size == 518
    ours.save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path).vocab_size == 49408


def test_save_pretrained_round_trips_through_transformers(tmp_path, ours):
    ours.save_pretrained(tmp_path)
    hf = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    assert len(hf) == 49408 and (hf.bos_token_id, hf.eos_token_id) == (49406, 49407)
    assert hf.model_max_length == CTX
    cleaned = [_ref_clean(t) for t in CORPUS]
    np.testing.assert_array_equal(_hf_rows(hf, cleaned), ours.encode(CORPUS))
    # transformers 4's files (vocab.json + merges.txt) alone give the same tokenizer too.
    (tmp_path / "tokenizer.json").unlink()
    hf_v4_files = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    np.testing.assert_array_equal(_hf_rows(hf_v4_files, cleaned), ours.encode(CORPUS))
    np.testing.assert_array_equal(load_tokenizer(tmp_path).encode(CORPUS), ours.encode(CORPUS))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("tokenizer.json", "{not json", "not valid JSON"),
        ("tokenizer.json", json.dumps({"model": {"type": "WordPiece", "vocab": {}}}), "BPE"),
        ("tokenizer.json", json.dumps({"model": {"type": "BPE", "end_of_word_suffix": None}}), "end_of_word"),
        ("vocab.json", json.dumps({"a": 0}), "special token"),
        ("vocab.json", "[1, 2]", "token -> integer id"),
        ("merges.txt", "#version: 0.2\nc a\nthree parts here\n", "merge 3"),
        ("merges.txt", "#version: 0.2\nq z\n", "not in the vocabulary"),
    ],
)
def test_corrupt_tokenizer_file_is_named(tmp_path, name, content, message):
    vocab, merges = _tiny_vocab()
    if name != "tokenizer.json":
        (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (tmp_path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(CheckpointError, match=message) as err:
        load_tokenizer(tmp_path)
    assert name in str(err.value)


def test_incomplete_or_missing_folder(tmp_path):
    (tmp_path / "vocab.json").write_text("{}", encoding="utf-8")
    with pytest.raises(CheckpointError, match="merges.txt"):
        load_tokenizer(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")


def test_corrupt_gz_is_named(tmp_path, monkeypatch):
    bad = tmp_path / "bpe.txt.gz"
    bad.write_bytes(gzip.compress(b"#version\nonly one merge\n"))
    monkeypatch.setattr("mlx_clip.model.tokenizer.DEFAULT_VOCAB_PATH", bad)
    with pytest.raises(CheckpointError, match="bpe.txt.gz"):
        load_tokenizer()


def test_long_texts_do_not_fill_the_cleaning_cache():
    """A server takes texts up to 4096 characters: caching each would let the 65,536-entry cache
    hold about half a gigabyte. Only short texts (captions, prompts) are kept."""
    from mlx_clip.model import tokenizer as tok

    tok._clean_cached.cache_clear()
    long_text = "A Photo  of " * 1000
    assert tok.clean_text(long_text) == " ".join(long_text.split()).lower()
    assert tok._clean_cached.cache_info().currsize == 0
    assert tok.clean_text("A  Photo") == "a photo"
    assert tok._clean_cached.cache_info().currsize == 1
