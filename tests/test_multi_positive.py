"""--no-multi-positive: only each (image, caption) pair is a positive, as in CLIP's one-hot loss."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_clip.data.loader import Batch
from tests.train_helpers import run, small_config


def test_positive_ids_follow_the_switch():
    labels = np.array([0, 0, 1, 1], dtype=np.int64)
    batch = Batch(np.zeros((4, 2, 2, 3), np.float32), np.zeros((4, 8), np.int64), labels,
                  np.arange(4), np.arange(4))
    assert batch.positive_ids.tolist() == [0, 0, 1, 1]
    batch.multi_positive = False
    assert batch.positive_ids.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("engine", ["mlx", "torch"])
def test_the_switch_reaches_the_loss(tmp_path, engine):
    """The demo's class folders put several samples of one class in a batch of 8, so treating
    them as negatives (one-hot targets) must give another first-step loss."""
    losses = {}
    for flag in (True, False):
        result = run(small_config(tmp_path / str(flag), engine, steps=1, save_every=0, multi_positive=flag))
        losses[flag] = result.train.losses[0]
    assert losses[True] != pytest.approx(losses[False], rel=1e-4), losses


# --- different images captioned alike ---------------------------------------------------------------
def _reference_groups(image_ids, captions) -> np.ndarray:
    """(B, B) bool: pairs i, j positive when linked through a chain of shared images or shared
    caption keys (`_key`); components by breadth-first search."""
    key = _key
    b = len(captions)
    linked = [[image_ids[i] == image_ids[j] or key(captions[i]) == key(captions[j]) for j in range(b)] for i in range(b)]
    component = [-1] * b
    for start in range(b):
        if component[start] >= 0:
            continue
        component[start], queue = start, [start]
        while queue:
            i = queue.pop()
            for j in range(b):
                if linked[i][j] and component[j] < 0:
                    component[j] = start
                    queue.append(j)
    return np.equal.outer(component, component)


def test_images_captioned_alike_are_positives_of_each_other():
    from mlx_clip.data.duplicates import positive_groups

    image_ids = np.array([0, 1, 2, 3, 3, 4, 5, 6])
    captions = ["A dog.", "a cat", "  a   DOG ", "a puppy", "a cat!", "Ａ dog", "“a bird”", "a bird on a wire"]
    groups = positive_groups(image_ids, captions)
    assert (np.equal.outer(groups, groups) == _reference_groups(image_ids, captions)).all(), groups
    assert groups[0] == groups[2] == groups[5] and groups[1] == groups[3] == groups[4] and groups[6] != groups[7]


def test_caption_keys_follow_the_documented_comparison():
    from mlx_clip.data.duplicates import caption_keys

    tricky = ["A dog.", "Ａ DOG", "“a bird”", "a\u00a0dog", "a\u3000dog", "a cat $", "...", "(a) [b]!", "Straße",
              "ÉCOLE", "e\u0301cole", "  tabs\tand\nlines  ", "¿qué?", "a dog…"]
    assert caption_keys(tricky).to_pylist() == [_key(t) for t in tricky]


def _captions_file(folder, captions: list[str]):
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    lines = ["image,caption"]
    for i, caption in enumerate(captions):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(f"{i}.png,{caption}")
    (folder / "captions.csv").write_text("\n".join(lines) + "\n")
    return folder / "captions.csv"


CAPTIONS = ["a red circle", "A red circle.", "a blue square", "a green triangle", "a blue square!", "a red dot",
            "a yellow star", "a purple moon"]


def _key(text: str) -> str:
    """The documented comparison, written again here: NFKC, lower case, whitespace runs as one
    space, whitespace and punctuation (Unicode category P*) dropped at both ends."""
    import unicodedata

    text = " ".join(unicodedata.normalize("NFKC", text).lower().split())

    def edge(c: str) -> bool:
        return c.isspace() or unicodedata.category(c).startswith("P")

    while text and edge(text[0]):
        text = text[1:]
    while text and edge(text[-1]):
        text = text[:-1]
    return text


@pytest.mark.parametrize("engine", ["mlx", "torch"])
def test_shared_captions_are_counted_and_reach_the_loss(tmp_path, engine):
    """Eight images, two pairs of them captioned alike: the start record counts those 4 pairs, and
    treating them as negatives (--no-multi-positive) gives another first-step loss."""
    import json

    data = _captions_file(tmp_path / "data", CAPTIONS)
    val = _captions_file(tmp_path / "val", ["a white cloud", "a black cat", "an orange fish", "a grey wolf"])
    images_by_key: dict[str, set] = {}
    for i, caption in enumerate(CAPTIONS):
        images_by_key.setdefault(_key(caption), set()).add(i)
    expected = sum(1 for caption in CAPTIONS if len(images_by_key[_key(caption)]) > 1)
    assert expected == 4
    losses = {}
    for flag in (True, False):
        out = tmp_path / f"run-{flag}"
        cfg = small_config(out, engine, steps=1, save_every=0, data=str(data), val_data=str(val),
                           multi_positive=flag, batch_size=8)
        losses[flag] = run(cfg).train.losses[0]
        start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        assert start["shared_captions"] == expected, start
        assert start["shared_captions_are"].startswith("positives" if flag else "negatives"), start
    assert losses[True] != pytest.approx(losses[False], rel=1e-4), losses
