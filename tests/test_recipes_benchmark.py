"""`python -m mlx_clip.benchmarks.recipes`: where it may write, and the NegCLIP captions it makes.
(The training it runs is the trainer's, tested elsewhere; its figures are in the README.)"""

from __future__ import annotations

import csv

from mlx_clip.benchmarks.recipes import MARKER, NEGATIVES, captions_with_negatives, refusal
from mlx_clip.data.demo import CONTROL_COLOURS, PATTERNS


def test_it_replaces_only_its_own_folders(tmp_path):
    assert refusal(tmp_path / "new", None) is None
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file")
    assert "is not empty and holds no recipes.json" in refusal(tmp_path / "mine", None)
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / MARKER).write_text("{}")
    assert refusal(tmp_path / "earlier", None) is None
    assert "lies in a folder this run replaces" in refusal(tmp_path / "earlier", tmp_path / "earlier" / "plain" / "final")
    assert refusal(tmp_path / "earlier", tmp_path / "earlier" / "stage-a" / "final") is None


def test_each_negative_swaps_one_word_for_another_of_the_domain(tmp_path):
    colours = list(CONTROL_COLOURS)
    for name in (f"{colours[0]}_{PATTERNS[0]}", f"{colours[1]}_{PATTERNS[3]}"):
        (tmp_path / "b" / "train" / name).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "b" / "train" / name / f"{i:04d}.png").write_bytes(b"")
    rows = list(csv.DictReader(captions_with_negatives(tmp_path / "b", tmp_path / "pairs.csv", 0).open()))
    assert len(rows) == 6 and NEGATIVES == "other_colour,other_pattern"
    for row in rows:
        colour, pattern = row["image"].split("/")[-2].split("_", 1)
        words = pattern.replace("_", " ")
        assert f"{colour} {words}" in row["caption"]
        swapped_colour = row["other_colour"].replace(words, "").split()
        assert row["other_colour"] != row["caption"] and words in row["other_colour"]
        assert any(c in swapped_colour for c in colours if c != colour)
        assert row["other_pattern"] != row["caption"] and f"{colour} " in row["other_pattern"]
        assert any(p.replace("_", " ") in row["other_pattern"] for p in PATTERNS if p != pattern)
