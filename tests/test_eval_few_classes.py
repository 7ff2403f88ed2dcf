"""Issue 20: evaluations that would score 1.0 whatever the model are refused or reported "n/a".

Zero-shot classification over one class calls every image right; top-k over k or fewer classes,
and recall@K over K or fewer candidates, likewise. The data are real handwritten digits
(scikit-learn's `load_digits`, inside its wheel) as class folders; the model is a random tiny CLIP
saved by transformers. The reference for how "not applicable" is written is CLIP_benchmark: its
zero-shot and linear-probe code report acc5 as NaN when there are fewer than 5 classes (strict
JSON: null), and `clip_benchmark build` must still tabulate the files.
"""

import mlx_clip  # noqa: F401  (first, as everywhere)

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mlx_clip.api import load
from mlx_clip.cli import main
from mlx_clip.data.records import Dataset, load_dataset
from mlx_clip.errors import DataError
from mlx_clip.evaluation import evaluate as ev
from mlx_clip.evaluation.evaluate import compare, evaluate, retrieval, zero_shot
from tests.test_evaluate import tiny_model_folder

TEMPLATES = ["a photo of the digit {}.", "a handwritten {}."]
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write_digits(root: Path, digits: list[int], per_class: int, offset: int = 0) -> Path:
    """ROOT/<digit name>/<i>.png: scikit-learn's 8x8 digits, grey levels 0..16 -> RGB 16x16."""
    from sklearn.datasets import load_digits

    data = load_digits()
    for d in digits:
        folder = root / NAMES[d]
        folder.mkdir(parents=True)
        rows = np.nonzero(data.target == d)[0][offset:offset + per_class]
        for i, row in enumerate(rows):
            grey = (data.images[row] * (255 / 16)).astype(np.uint8)
            Image.fromarray(grey).convert("RGB").resize((16, 16), Image.NEAREST).save(folder / f"{i}.png")
    return root


def write_captions(path: Path, image_folder: Path, n: int) -> Path:
    images = sorted(image_folder.rglob("*.png"))[:n]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("image", "caption"))
        writer.writerows((p.as_posix(), f"a handwritten {p.parent.name}") for p in images)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    split = root / "split3"
    write_digits(split / "train", [0, 1, 2], per_class=6)
    write_digits(split / "val", [0, 1, 2], per_class=3, offset=6)
    one_split = root / "split1"
    write_digits(one_split / "train", [7], per_class=6)
    write_digits(one_split / "val", [7], per_class=3, offset=6)
    return {"one": write_digits(root / "one", [3], per_class=5),
            "two": write_digits(root / "two", [0, 1], per_class=5),
            "split3": split, "split1": one_split,
            "captions3": write_captions(root / "three.csv", root / "two", 3),
            "captions1": write_captions(root / "single.csv", root / "two", 1)}


# --- fewer than 2 classes: refused ----------------------------------------------------------------


@pytest.mark.parametrize("case", ["auto", "zero_shot", "control", "probe"])
def test_one_class_is_refused_naming_the_folder_and_count_before_any_model_loads(data, tmp_path, case):
    kwargs = {"zero_shot": {"tasks": "zero_shot"}, "probe": {"tasks": "linear_probe"}}.get(case, {})
    target, folder = data["two"], data["one"]
    if case == "control":
        kwargs["control"] = folder
    else:
        target = folder if case != "probe" else data["split1"]
        folder = target
    with pytest.raises(ev.TooFewClassesError) as err:
        evaluate(tmp_path / "no-model-here", target, **kwargs)
    assert err.value.num_classes == 1 and err.value.source == str(folder)
    message = str(err.value)
    assert str(folder) in message and "needs at least 2 classes, got 1" in message
    assert "\n" not in message and isinstance(err.value, DataError)


def test_cli_eval_on_one_class_folder_prints_one_error_line_and_exits_2(model, data, tmp_path):
    got = CliRunner().invoke(main, ["eval", "--model", str(model), "--data", str(data["one"]),
                                    "--out", str(tmp_path / "r")])
    assert got.exit_code == 2, got.output
    lines = got.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert str(data["one"]) in lines[0] and "got 1" in lines[0]
    assert not (tmp_path / "r").exists()


def test_zero_shot_on_one_class_raises_too_few_classes_for_the_finetune_evaluator(model, data):
    """finetune.make_evaluator calls zero_shot(...)["acc1"] on a held-out split: one class must
    raise TooFewClassesError (a DataError carrying the count), never return acc1 = 1.0."""
    one = load_dataset(data["one"])
    held_out = Dataset(one.samples, one.class_names, TEMPLATES, "class_folders", Path("val"))
    with pytest.raises(ev.TooFewClassesError, match=r"^val: zero-shot classification needs at least 2 classes, got 1"):
        ev.check_classes(held_out)
    with pytest.raises(ev.TooFewClassesError) as err:
        zero_shot(load(model), held_out, TEMPLATES, batch_size=4)
    assert err.value.num_classes == 1
    ev.check_classes(load_dataset(data["two"]))  # two classes are fine


# --- k at or past the number of candidates: not applicable ----------------------------------------


def test_two_classes_top5_is_not_applicable_in_every_output(model, data, tmp_path):
    out = tmp_path / "r"
    runner = CliRunner().invoke(main, ["eval", "--model", str(model), "--data", str(data["two"]),
                                       "--out", str(out)])
    assert runner.exit_code == 0, runner.output
    line = runner.output.strip().splitlines()[-1]
    assert "zeroshot_classification: acc1 " in line and "acc5 n/a" in line, line

    saved = json.loads((out / "eval.json").read_text())[0]
    assert saved["metrics"]["acc5"] is None and 0.0 <= saved["metrics"]["acc1"] <= 1.0
    assert "| acc5 | n/a |" in (out / "eval.md").read_text()
    [dump] = (out / "eval-clip_benchmark").glob("*.json")
    metrics = json.loads(dump.read_text())["metrics"]
    assert "acc5" in metrics and metrics["acc5"] is None  # CLIP_benchmark's NaN, as strict JSON

    pytest.importorskip("clip_benchmark")
    csv_path = tmp_path / "benchmark.csv"
    done = subprocess.run([sys.executable, "-m", "clip_benchmark.cli", "build", str(dump.parent),
                           "--output", str(csv_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    [row] = list(csv.DictReader(open(csv_path, newline="")))
    assert row["acc5"] == "" and float(row["acc1"]) == pytest.approx(saved["metrics"]["acc1"])


def test_zero_shot_two_classes_returns_nan_top5_for_callers(model, data):
    got = zero_shot(load(model), load_dataset(data["two"]), TEMPLATES)
    assert np.isnan(got["acc5"]) and 0.0 <= got["acc1"] <= 1.0


def test_compare_on_two_classes_shows_top5_not_applicable(model, data, tmp_path):
    result = compare(model, model, data["two"], templates=TEMPLATES, out=tmp_path / "cmp")
    md = result.markdown.read_text()
    assert "| acc5 | n/a | n/a | — |" in md and "| acc1 |" in md
    saved = json.loads(result.files[0].json.read_text())
    assert "acc5" not in saved["delta"] and saved["delta"]["acc1"] == 0.0


def test_linear_probe_on_three_classes_reports_top5_not_applicable(model, data):
    [probe] = evaluate(model, data["split3"], tasks="linear_probe")
    assert probe["metrics"]["acc5"] is None and 0.0 <= probe["metrics"]["acc1"] <= 1.0
    assert probe["val_images"] + probe["train_images"] == 18 and probe["images"] == 9


def test_retrieval_recall_at_k_past_the_candidates_is_not_applicable(model, data):
    [result] = evaluate(model, data["captions3"])
    m = result["metrics"]
    assert result["captions"] == 3 and result["images"] == 3
    for side in ("image", "text"):
        assert 0.0 <= m[f"{side}_retrieval_recall@1"] <= 1.0
        assert m[f"{side}_retrieval_recall@5"] is None and m[f"{side}_retrieval_recall@10"] is None
    raw = retrieval(load(model), load_dataset(data["captions3"]))
    assert np.isnan(raw["image_retrieval_recall@5"]) and not np.isnan(raw["image_retrieval_recall@1"])


def test_retrieval_over_one_image_is_refused_before_any_model_loads(data, tmp_path):
    with pytest.raises(DataError, match=r"single\.csv: retrieval needs at least 2 images, got 1"):
        evaluate(tmp_path / "no-model-here", data["captions1"])
