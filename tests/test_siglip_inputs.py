"""SigLIP's inputs held to references we did not write: the tokenizer (transformers' slow
SentencePiece `SiglipTokenizer` under big_vision's canonicalisation, and `AutoTokenizer` for
interoperability) and the image preprocessing (transformers' PIL `SiglipImageProcessor`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


def tokenizer_strings() -> list[str]:
    """Captions of the demo kind, prompts, punctuation, case, digits, unicode, unknown words,
    whitespace oddities, and texts longer than the context (truncation)."""
    from mlx_clip.model.builtin_tokenizer import COMMON_WORDS

    rng = np.random.default_rng(0)
    words = COMMON_WORDS.split()
    odd = ["Zebra", "QUOKKA", "xylophone!!", "naïve", "café", "Ünïcödé", "ﬁne", "Ｆｕｌｌ", "😀", "日本語", "e-mail",
           "it's", "3.14", "#1", "(hello)", "[x]", "a/b", "tab\there", "new\nline", "  spaced  ", "don't", "100%"]
    texts = ["", " ", "a", "a photo of a red circle.", "A LARGE Blue Square in the top-left!!"]
    for i in range(240):
        length = int(rng.integers(1, 30 if i % 5 else 60))
        pool = words if i % 3 else words + odd
        picked = [pool[int(j)] for j in rng.integers(0, len(pool), size=length)]
        if i % 4 == 0:
            picked = [w.upper() if k % 2 else w.capitalize() for k, w in enumerate(picked)]
        sep = ", " if i % 7 == 0 else " "
        texts.append(sep.join(picked) + ("." if i % 2 else ""))
    return texts


def sentencepiece_model(tokenizer_json: Path, out: Path) -> Path:
    """The Unigram piece table of a tokenizer.json (pieces and scores: data, not code) as a
    SentencePiece model file, the format google/siglip-* ship (`spiece.model`), with SigLIP's ids
    (`<pad>` 0, `</s>` 1, `<unk>` 2, no `<s>`) and T5's / SigLIP's `nmt_nfkc` normaliser. The
    normaliser spec comes from a throwaway model that SentencePiece's own trainer writes."""
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["a b c d e f g h"] * 10), model_prefix=str(out.with_suffix("")), vocab_size=12,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, normalization_rule_name="nmt_nfkc",
        num_threads=1, hard_vocab_limit=False, minloglevel=2)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(out.read_bytes())
    del proto.pieces[:]
    kinds = {"<unk>": proto.SentencePiece.UNKNOWN, "<pad>": proto.SentencePiece.CONTROL,
             "</s>": proto.SentencePiece.CONTROL}
    model = json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]
    assert model["type"] == "Unigram" and model["vocab"][:3] == [["<pad>", 0.0], ["</s>", 0.0], ["<unk>", 0.0]]
    for piece, score in model["vocab"]:
        proto.pieces.add(piece=piece, score=score, type=kinds.get(piece, proto.SentencePiece.NORMAL))
    out.write_bytes(proto.SerializeToString())
    return out


def test_tokenizer_ids_equal_sentencepiece_under_big_vision_canonicalisation(tmp_path):
    """siglip-tiny's tokenizer against an implementation we did not write and that shares no code
    with ours: transformers' slow `SiglipTokenizer`, which canonicalises text in Python as
    big_vision does for SigLIP (`canonicalize_text`: lower-case, delete string.punctuation, squeeze
    whitespace) and segments with Google's SentencePiece library (C++ Viterbi), on the same piece
    table exported as an spiece.model. Ours runs the tokenizer.json's normaliser and Unigram model
    in the Rust `tokenizers` library, then cuts, appends `</s>` and pads in our own code; the
    AutoTokenizer test below shares that Rust library with us, this one does not.

    Exact integer equality: on big_vision-canonicalised text every row agrees, truncation and
    padding included. On raw text the rows may differ only where punctuation sits between two
    other characters: the built-in normaliser turns punctuation into a space ("top-left" ->
    "top left") where big_vision deletes it ("topleft"); everywhere else raw rows agree too."""
    import re
    import string

    import transformers

    from mlx_clip.api import resolve
    from mlx_clip.model.tokenizer import load_tokenizer

    folder = resolve("siglip-tiny")
    ours = load_tokenizer(folder)
    reference = transformers.SiglipTokenizer(
        vocab_file=str(sentencepiece_model(folder / "tokenizer.json", tmp_path / "spiece.model")))
    assert reference.vocab_size == ours.vocab_size
    texts = tokenizer_strings() + [
        "日本語 and 😀😀 unknown runs", "snake_case under_score", "ÀÉÎ õü çà", "Ｆｕｌｌ ｗｉｄｔｈ ＡＢＣ １２３",
        "ﬁne ﬂow", "3.14 1,000 10:30 #1", "a\u00a0b\u2003c", "   leading and trailing   ", "..."]
    length = ours.context_length

    def reference_ids(batch):
        return np.array(reference(batch, padding="max_length", max_length=length, truncation=True)["input_ids"])

    canonical = [reference.canonicalize_text(t) for t in texts]
    np.testing.assert_array_equal(ours.encode(canonical), reference_ids(canonical))
    assert max(ours.token_counts(canonical)) > length  # some rows are cut, not padded
    assert (ours.encode(canonical) == 2).any()  # and some hold <unk>

    punct = re.escape(string.punctuation)
    inner = re.compile(rf"[^\s{punct}][{punct}]+[^\s{punct}]")
    raw_ours, raw_ref = ours.encode(texts), reference_ids(texts)
    differ = {t for t, a, b in zip(texts, raw_ours, raw_ref) if not np.array_equal(a, b)}
    assert differ <= {t for t in texts if inner.search(t)}, sorted(differ - {t for t in texts if inner.search(t)})
    assert sum(not inner.search(t) for t in texts) >= 200  # rows that must agree as they are


def test_tokenizer_ids_equal_transformers_autotokenizer(tmp_path):
    """The folder loads in transformers.AutoTokenizer to the same ids (interoperability; the
    independent reference is the SentencePiece test above)."""
    import transformers

    from mlx_clip.api import resolve
    from mlx_clip.model.tokenizer import load_tokenizer

    folder = resolve("siglip-tiny")
    ours = load_tokenizer(folder)
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    texts = tokenizer_strings()
    assert len(texts) >= 200
    length = ours.context_length
    ids = ours.encode(texts)
    ref = np.array(reference(texts, padding="max_length", max_length=length, truncation=True)["input_ids"])
    assert ids.shape == ref.shape == (len(texts), length)
    agree = int((ids == ref).all(axis=1).sum())
    assert agree == len(texts), f"{agree}/{len(texts)} rows agree"
    assert max(ours.token_counts(texts)) > length  # some rows are cut, not padded
    assert ours.trim(ids) is ids  # SigLIP pools the last position: padding is never trimmed


def test_tokenizer_refuses_a_folder_without_tokenizer_json(tmp_path):
    from mlx_clip.errors import CheckpointError
    from mlx_clip.model.tokenizer import load_tokenizer

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    (tmp_path / "spiece.model").write_bytes(b"")
    with pytest.raises(CheckpointError, match="tokenizer.json.*spiece.model"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("size", [32, 30, 64])
def test_preprocessing_equals_pil_siglip_image_processor(size):
    from PIL import Image
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from mlx_clip.model.image_processing import SIGLIP_MEAN, SIGLIP_STD, preprocess

    reference = SiglipImageProcessorPil(size={"height": size, "width": size})
    rng = np.random.default_rng(size)
    for width, height in ((50, 80), (17, 17), (200, 31), (size, size)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        ref = reference(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        ours = preprocess(image, size, mean=SIGLIP_MEAN, std=SIGLIP_STD, crop=False)
        np.testing.assert_array_equal(ours, ref)


def test_model_folder_preprocessing_is_read_from_its_config():
    from mlx_clip.api import preprocessor_settings, resolve

    assert preprocessor_settings(resolve("siglip-tiny")) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), False)
    assert preprocessor_settings(resolve("tiny"))[2] is True
