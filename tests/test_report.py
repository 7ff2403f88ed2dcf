"""Report writers: CLIP_benchmark-shaped JSON, Markdown carrying the numbers, PNG figures.

The expected values are hand-computed from the inputs; the figures are checked as real PNGs
(signature + size read back with matplotlib's own reader).
"""

import mlx_clip  # noqa: F401  (first, as everywhere)

import json

import matplotlib
import matplotlib.image
import numpy as np
import pytest

from mlx_clip.errors import DataError
from mlx_clip.evaluation.metrics import confusion_matrix, per_class_accuracy
from mlx_clip.evaluation.results import (
    compare_table,
    results_json,
    write_comparison,
    write_report,
)
from mlx_clip.robust.wise_ft_report import wise_ft_curve_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def strict_json(path):
    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(path.read_text(), parse_constant=reject)


def assert_png(path, min_pixels=200):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    h, w = matplotlib.image.imread(path).shape[:2]
    assert h >= min_pixels and w >= min_pixels


def classification_result():
    targets = np.array([0, 0, 0, 1, 1, 3])
    logits = np.eye(4, dtype=np.float32)[[0, 0, 1, 1, 2, 0]]
    return results_json(
        "pets", "ViT-B-32", "zeroshot_classification",
        {"acc1": 0.5, "acc5": 1.0, "mean_per_class_recall": 0.3888888, "acc9": float("nan")},
        class_names=["cat", "dog", "hamster", "parrot"],
        per_class=per_class_accuracy(logits, targets),
        confusion_matrix=confusion_matrix(logits, targets),
    )


def test_results_json_is_clip_benchmark_shaped_and_strict():
    r = classification_result()
    assert list(r)[:4] == ["dataset", "model", "task", "metrics"]
    assert r["metrics"]["acc9"] is None  # NaN -> null
    assert r["per_class"][2] is None  # hamster has no samples
    assert r["confusion_matrix"][1] == [0, 1, 1, 0]
    json.dumps(r, allow_nan=False)
    with pytest.raises(DataError, match="task must be one of"):
        results_json("d", "m", "zero_shot", {"acc1": 1.0})
    with pytest.raises(DataError, match="disagree on C"):
        results_json("d", "m", "linear_probe", {"acc1": 1.0}, class_names=["a"], per_class=[1.0, 0.0])


def test_write_report_files_and_contents(tmp_path):
    backend = matplotlib.get_backend()
    retrieval = results_json("flickr-mini", "ViT-B-32", "zeroshot_retrieval",
                             {"image_retrieval_recall@1": 0.6, "text_retrieval_recall@1": 1 / 3})
    files = write_report([classification_result(), retrieval], tmp_path / "out" / "eval.json")
    assert matplotlib.get_backend() == backend  # the writer never switches pyplot's backend

    data = strict_json(files.json)
    assert [d["task"] for d in data] == ["zeroshot_classification", "zeroshot_retrieval"]
    assert data[0]["metrics"]["acc1"] == 0.5 and data[0]["class_names"][3] == "parrot"

    md = files.markdown.read_text()
    assert files.markdown == tmp_path / "out" / "eval.md"
    for line in ("| acc1 | 0.5000 |", "| mean_per_class_recall | 0.3889 |", "| acc9 | n/a |",
                 "| cat | 0.6667 | 3 |", "| hamster | n/a | 0 |", "| parrot | 0.0000 | 1 |",
                 "| image_retrieval_recall@1 | 0.6000 |", "| text_retrieval_recall@1 | 0.3333 |",
                 "## pets · ViT-B-32 · zeroshot_classification"):
        assert line in md, line
    # confusion + per-class for classification, the recall@K curve for retrieval
    assert [p.name for p in files.figures] == ["eval-0-pets-ViT-B-32-confusion.png",
                                               "eval-0-pets-ViT-B-32-per_class.png",
                                               "eval-1-flickr-mini-ViT-B-32-recall.png"]
    for png in files.figures:
        assert_png(png)
        assert f"]({png.name})" in md


def test_not_applicable_metric_is_null_in_every_json_and_n_a_in_markdown(tmp_path):
    """CLIP_benchmark dumps acc5 = NaN for fewer than 5 classes; strict JSON writes it as null,
    in our result list and in the per-result file `clip_benchmark build` reads."""
    r = results_json("digits", "tiny", "zeroshot_classification",
                     {"acc1": 0.5, "acc5": float("nan"), "mean_per_class_recall": 0.5})
    files = write_report([r], tmp_path / "eval.json")
    assert strict_json(files.json)[0]["metrics"]["acc5"] is None
    [dump] = (tmp_path / "eval-clip_benchmark").glob("*.json")
    assert strict_json(dump)["metrics"] == {"acc1": 0.5, "acc5": None, "mean_per_class_recall": 0.5}
    assert "| acc5 | n/a |" in files.markdown.read_text()


def test_comparison_figure_marks_not_applicable_metrics():
    from mlx_clip.evaluation.figures import _comparison_figure

    base = {"acc1": 0.5, "acc5": None, "mean_per_class_recall": 0.5}
    tuned = {"acc1": 0.75, "acc5": None, "mean_per_class_recall": 0.6}
    ax = _comparison_figure(base, tuned, "t").axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["acc1", "acc5", "mean_per_class_recall"]
    assert [t.get_text() for t in ax.texts] == ["n/a"]
    assert len(ax.patches) == 4  # two bars for each applicable metric, none for acc5


def test_compare_table_numbers_and_delta():
    base = results_json("pets", "base", "zeroshot_classification", {"acc1": 0.5, "acc5": 0.9})
    tuned = results_json("pets", "tuned", "zeroshot_classification",
                         {"acc1": 0.625, "acc5": 0.875, "mean_per_class_recall": 0.6})
    table = compare_table(base, tuned).splitlines()
    assert table[0] == "| metric | base | fine-tuned | Δ (fine-tuned − base) |"
    assert "| acc1 | 0.5000 | 0.6250 | +0.1250 |" in table
    assert "| acc5 | 0.9000 | 0.8750 | -0.0250 |" in table
    assert "| mean_per_class_recall | — | 0.6000 | — |" in table
    with pytest.raises(DataError, match="different dataset"):
        compare_table(base, results_json("cars", "t", "zeroshot_classification", {"acc1": 1.0}))


def test_write_comparison(tmp_path):
    base = results_json("pets", "base", "linear_probe", {"acc1": 0.5, "reg": 10.0})
    tuned = results_json("pets", "tuned", "linear_probe", {"acc1": 0.75, "reg": 1.0})
    files = write_comparison(base, tuned, tmp_path / "cmp.json")
    data = strict_json(files.json)
    assert data["delta"] == {"acc1": 0.25, "reg": -9.0}
    assert data["base"]["model"] == "base" and data["finetuned"]["model"] == "tuned"
    md = files.markdown.read_text()
    assert "| acc1 | 0.5000 | 0.7500 | +0.2500 |" in md and "`tuned`" in md
    assert [p.name for p in files.figures] == ["cmp.png"]  # no per-class chart without per_class
    assert_png(files.figures[0])


def curve(alphas, target, control):
    return [{"alpha": a, "target": {"acc1": t}, "control": {"acc1": c}}
            for a, t, c in zip(alphas, target, control)]


def test_wise_ft_best_alpha_under_control_floor(tmp_path):
    # Shuffled on purpose; target rises with alpha while control falls.
    points = curve([1.0, 0.0, 0.5, 0.25, 0.75], [0.9, 0.6, 0.8, 0.7, 0.85], [0.4, 0.7, 0.62, 0.66, 0.5])
    rep = wise_ft_curve_report(points, tmp_path / "wise.json", control_floor=0.6)
    assert rep.best_alpha == 0.5  # 0.75 and 1.0 have higher target but control < 0.6
    data = strict_json(rep.files.json)
    assert [p["alpha"] for p in data["points"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert data["best_alpha"] == 0.5 and data["control_floor"] == 0.6
    md = rep.files.markdown.read_text()
    assert "| 0.5 **(chosen)** | 0.8000 | 0.6200 | yes |" in md
    assert "| 0.75 | 0.8500 | 0.5000 | no |" in md
    assert_png(rep.files.figures[0])
    # No floor: the highest target wins.
    assert wise_ft_curve_report(points, tmp_path / "w2.json").best_alpha == 1.0


def test_wise_ft_no_alpha_qualifies_and_ties(tmp_path):
    points = curve([0.0, 0.5, 1.0], [0.6, 0.8, 0.8], [0.55, 0.5, 0.3])
    rep = wise_ft_curve_report(points, tmp_path / "w.json", control_floor=0.6)
    assert rep.best_alpha is None
    assert rep.message.startswith("no alpha keeps control acc1 >= 0.6000")
    assert strict_json(rep.files.json)["best_alpha"] is None
    assert rep.message in rep.files.markdown.read_text()
    # Equal target at 0.5 and 1.0: the smaller alpha (closer to zero-shot) is chosen.
    assert wise_ft_curve_report(points, tmp_path / "t.json").best_alpha == 0.5
    with pytest.raises(DataError, match="repeat an alpha"):
        wise_ft_curve_report(curve([0.5, 0.5], [1, 1], [1, 1]), tmp_path / "x.json")
    with pytest.raises(DataError, match="no numeric 'acc1'"):
        wise_ft_curve_report([{"alpha": 0, "target": {"acc5": 1}, "control": {"acc1": 1}}],
                             tmp_path / "y.json")
