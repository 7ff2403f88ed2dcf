"""False negatives from repeated captions: two different images captioned alike ("A dog." and
"a dog") are positives of each other's caption, not negatives, unless `--no-multi-positive`.

Captions are compared after `caption_keys`: Unicode NFKC, lower case, runs of whitespace as one
space, and leading or trailing whitespace and punctuation dropped. It is one pyarrow expression,
used for a batch and for a whole table alike, so the count in a run's start record and the
batches' positives compare captions the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_EDGES = r"^[\s\p{P}]+|[\s\p{P}]+$"


def caption_keys(captions: pa.Array | pa.ChunkedArray | Sequence[str]) -> pa.Array | pa.ChunkedArray:
    if not isinstance(captions, (pa.Array, pa.ChunkedArray)):
        captions = pa.array(list(captions), pa.string())
    text = pc.utf8_lower(pc.utf8_normalize(captions, "NFKC"))
    text = pc.replace_substring_regex(text, r"\s+", " ")
    return pc.replace_substring_regex(text, _EDGES, "")


def positive_groups(image_ids: np.ndarray, captions: Sequence[str]) -> np.ndarray:
    """(B,) ids, equal exactly where two pairs are positives: the same image or the same caption
    key, closed transitively (an image captioned "a dog" and "a puppy" joins every image captioned
    either way in the batch). Numbered by first appearance, so a batch without repeats gets 0..B-1
    in the order of its distinct images."""
    parent = list(range(len(image_ids)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for keys in (np.asarray(image_ids).tolist(), caption_keys(captions).to_pylist()):
        first: dict = {}
        for row, key in enumerate(keys):
            if key in first:
                a, b = root(row), root(first[key])
                parent[max(a, b)] = min(a, b)
            else:
                first[key] = row
    roots = [root(i) for i in range(len(parent))]
    numbering: dict[int, int] = {}
    return np.array([numbering.setdefault(r, len(numbering)) for r in roots], dtype=np.int64)


def shared_caption_count(captions: pa.ChunkedArray, image_ids: np.ndarray) -> int:
    """Pairs whose caption key is also another image's caption: the false negatives a batch could
    hold without multi-positive targets."""
    table = pa.table({"key": caption_keys(captions), "image": pa.array(np.asarray(image_ids, np.int64))})
    per_key = table.group_by("key").aggregate([("image", "count_distinct"), ("image", "count")])
    shared = pc.greater(per_key["image_count_distinct"], 1)
    return int(pc.sum(pc.filter(per_key["image_count"], shared)).as_py() or 0)
