"""The tokenizer of the built-in `siglip-tiny`, made at build time with the `tokenizers` library:
a SentencePiece-style Unigram model over the demo domain's words and common English words, shaped
like SigLIP's (lower-cased, `▁` word boundaries, `</s>` appended and used as padding; punctuation
becomes a space, where big_vision deletes it), saved as a tokenizer.json that `siglip_tokenizer` and `transformers.AutoTokenizer` load.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram

from mlx_clip.errors import ConfigError
from mlx_clip.model.siglip_tokenizer import TOKENIZER_JSON

# SigLIP (v1)'s special tokens: `</s>` ends every row and pads it; `<unk>` stands for unknown pieces.
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"

def _demo_corpus() -> list[str]:
    """Every word the demo domain, its prompts and everyday captions use, as training text."""
    from mlx_clip.data import demo
    from mlx_clip.data.templates import DEFAULT_TEMPLATES

    names = [n.replace("_", " ") for n in demo.target_classes() + demo.control_classes()]
    places = ["in the top left", "in the top right", "in the bottom left", "in the bottom right", "at the top",
              "at the bottom", "on the left", "on the right", "in the center"]
    lines = [t.replace("{}", n) for t in DEFAULT_TEMPLATES for n in names]
    lines += [f"a {size} {n} {p} on a {bg} background" for size in ("small", "large") for n in names
              for p in places for bg in ("grey", "dark grey", "light grey")]
    lines += [COMMON_WORDS] * 4
    return lines


COMMON_WORDS = (
    "the of and to in is it you that he was for on are with as his they be at one have this from or had by "
    "word but what some we can out other were all there when up use your how said an each she which do their "
    "time if will way about many then them write would like so these her long make thing see him two has look "
    "more day could go come did number sound no most people my over know water than call first who may down "
    "side been now find any new work part take get place made live where after back little only round man year "
    "came show every good me give our under name very through just form sentence great think say help low line "
    "differ turn cause much mean before move right boy old too same tell does set three want air well also play "
    "small end put home read hand port large spell add even land here must big high such follow act why ask men "
    "change went light kind off need house picture try us again animal point mother world near build self earth "
    "father head stand own page should country found answer school grow study still learn plant cover food sun "
    "four between state keep eye never last let thought city tree cross farm hard start might story saw far sea "
    "draw left late run while press close night real life few north open seem together next white children begin "
    "got walk example ease paper group always music those both mark often letter until mile river car feet care "
    "second book carry took science eat room friend began idea fish mountain stop once base hear horse cut sure "
    "watch colour color face wood main enough plain girl usual young ready above ever red list though feel talk "
    "bird soon body dog family direct pose leave song measure door product black short numeral class wind question "
    "happen complete ship area half rock order fire south problem piece told knew pass since top whole king space "
    "heard best hour better true during hundred five remember step early hold west ground interest reach fast verb "
    "sing listen six table travel less morning ten simple several vowel toward war lay against pattern slow center "
    "love person money serve appear road map rain rule govern pull cold notice voice unit power town fine certain "
    "fly fall lead cry dark machine note wait plan figure star box noun field rest correct able pound done beauty "
    "drive stood contain front teach week final gave green oh quick develop ocean warm free minute strong special "
    "mind behind clear tail produce fact street inch multiply nothing course stay wheel full force blue object "
    "decide surface deep moon island foot system busy test record boat common gold possible plane stead dry wonder "
    "laugh thousand ago ran check game shape equate hot miss brought heat snow tire bring yes distant fill east "
    "paint language among cat photo image photograph picture drawing painting shape circle square triangle"
)


def build_demo_tokenizer(vocab_size: int) -> Tokenizer:
    """A SentencePiece-style Unigram tokenizer (at most `vocab_size` pieces) shaped like SigLIP's:
    `<pad>` 0, `</s>` 1 (end of text and padding), `<unk>` 2, then one piece per word of
    `_demo_corpus` scored by its log frequency (so known words stay whole), then single characters
    (so any other word still spells out). Built directly rather than trained, so the file is the
    same bytes on every machine (the Unigram trainer is multi-threaded and not reproducible)."""
    normalizer = normalizers.Sequence([
        normalizers.NFKC(), normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~]"), " "),  # string.punctuation
        normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()])
    counts: dict[str, int] = {}
    for line in _demo_corpus():
        for word in normalizer.normalize_str(line).split():
            counts[word] = counts.get(word, 0) + 1
    total = sum(counts.values())
    words = sorted(counts, key=lambda w: (-counts[w], w))
    characters = ["▁", *"abcdefghijklmnopqrstuvwxyz0123456789"]
    pieces = [(PAD, 0.0), (EOS, 0.0), (UNK, 0.0)]
    pieces += [(f"▁{w}", math.log(counts[w] / total)) for w in words]
    # Characters score far below any word: a known word is never spelled out.
    pieces += [(c, -30.0) for c in characters]
    if len(pieces) > vocab_size:
        raise ConfigError(f"the demo tokenizer needs {len(pieces)} pieces, more than vocab_size {vocab_size}")
    tokenizer = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, 1)])
    tokenizer.add_special_tokens([PAD, EOS, UNK])
    return tokenizer


def write_demo_tokenizer(folder: Path, vocab_size: int, context_length: int) -> None:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json that this module and
    `transformers.AutoTokenizer` both load to the same ids."""
    build_demo_tokenizer(vocab_size).save(str(folder / TOKENIZER_JSON))
    specials = {"eos_token": EOS, "pad_token": EOS, "unk_token": UNK}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context_length, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
