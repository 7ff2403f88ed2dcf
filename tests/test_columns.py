"""Captions files whose columns (CSV) or keys (JSONL) have other names: --image-column and
--caption-column, through finetune and eval with real engines."""

from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

from mlx_clip.cli import main
from mlx_clip.data.demo import make_demo


@pytest.fixture(scope="module")
def renamed(tmp_path_factory):
    root = tmp_path_factory.mktemp("columns")
    demo = make_demo(root / "demo", image_size=16, per_class_train=2, per_class_val=2, per_class_control=1)
    with open(demo["captions_val"], newline="") as f:
        rows = [((demo["captions_val"].parent / r["image"]).as_posix(), r["caption"]) for r in csv.DictReader(f)]
    with open(root / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["photo_path", "alt_text"])
        writer.writerows(rows)
    (root / "pairs.jsonl").write_text("".join(json.dumps({"photo_path": p, "alt_text": c}) + "\n" for p, c in rows))
    return root


@pytest.mark.parametrize("name", ["pairs.csv", "pairs.jsonl"])
def test_finetune_and_eval_read_renamed_columns(renamed, tmp_path, name):
    data = str(renamed / name)
    columns = ["--image-column", "photo_path", "--caption-column", "alt_text"]
    runner = CliRunner()
    missing = runner.invoke(main, ["eval", "--model", "tiny", "--data", data, "--out", str(tmp_path / "e0")])
    assert missing.exit_code == 2 and "image" in missing.output  # the default names are not there
    trained = runner.invoke(main, ["finetune", "--model", "tiny", "--data", data, *columns, "--steps", "2",
                                   "--batch-size", "4", "--out", str(tmp_path / "run"), "--no-evaluate",
                                   "--num-workers", "0"])
    assert trained.exit_code == 0, trained.output
    evaluated = runner.invoke(main, ["eval", "--model", str(tmp_path / "run" / "final"), "--data", data, *columns,
                                     "--out", str(tmp_path / "e1")])
    assert evaluated.exit_code == 0, evaluated.output
    results = json.loads((tmp_path / "e1" / "eval.json").read_text())
    assert results[0]["task"] == "zeroshot_retrieval" and results[0]["images"] == 24
