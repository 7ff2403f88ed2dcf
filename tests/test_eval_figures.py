"""Evaluation pictures: the retrieval recall@K curve, the per-class base-vs-fine-tuned chart, and
the run report's links to the evaluation figures a run folder holds.

What each figure plots is checked against values the test computes itself (brute-force recall
over random embeddings, per-class differences matched by class name), both through the small
functions that return the plotted series and through the lines and labels drawn on the axes; the
files are checked as PNGs that PIL opens.
"""

import mlx_clip  # noqa: F401  (first, as everywhere)

import json
import re
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from mlx_clip.errors import DataError
from mlx_clip.evaluation.metrics import retrieval_recall_at_k
from mlx_clip.evaluation.figures import _per_class_moves, _plot_per_class_compare, _plot_recall, _recall_series
from mlx_clip.evaluation.results import _per_class_delta, results_json, write_comparison, write_report
from mlx_clip.training.run_report import evaluation_figures, write_run_report
from tests.test_report import classification_result, strict_json


def assert_png(path: Path, min_side: int = 300) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        assert min(im.size) >= min_side and max(im.size) < 6000, im.size


# --- retrieval recall@K ---------------------------------------------------------------------------

N_IMAGES, CAPTIONS_PER_IMAGE, KS = 6, 2, (1, 2, 5, 10)


def brute_force_recall(img, txt, t2i, k):
    """Recall@k by sorting every query's scores, one query at a time."""
    image_hits = []
    for t in range(len(txt)):
        order = sorted(range(len(img)), key=lambda i: (-float(txt[t] @ img[i]), i))
        image_hits.append(t2i[t] in order[:k])
    text_hits = []
    for i in range(len(img)):
        order = sorted(range(len(txt)), key=lambda t: (-float(img[i] @ txt[t]), t))
        text_hits.append(any(t2i[t] == i for t in order[:k]))
    return float(np.mean(image_hits)), float(np.mean(text_hits))


@pytest.fixture(scope="module")
def retrieval_case():
    rng = np.random.default_rng(3)
    img = rng.normal(size=(N_IMAGES, 8))
    t2i = np.repeat(np.arange(N_IMAGES), CAPTIONS_PER_IMAGE)
    txt = img[t2i] + rng.normal(scale=1.2, size=(len(t2i), 8))  # noisy captions: recalls below 1
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    metrics = retrieval_recall_at_k(img, txt, t2i, KS)
    result = results_json("captions-mini", "tiny", "zeroshot_retrieval", metrics,
                          images=N_IMAGES, captions=len(t2i))
    # Applicable Ks: image side K < 6 images; text side K <= 12 texts - 2 captions of an image.
    expected = {"image": [], "text": []}
    for k in KS:
        image_recall, text_recall = brute_force_recall(img, txt, t2i, k)
        if k < N_IMAGES:
            expected["image"].append((k, image_recall))
        if k <= len(t2i) - CAPTIONS_PER_IMAGE:
            expected["text"].append((k, text_recall))
    return result, expected


def test_recall_series_is_the_brute_force_recall_without_the_not_applicable_ks(retrieval_case):
    result, expected = retrieval_case
    assert result["metrics"]["image_retrieval_recall@10"] is None  # 10 >= 6 images
    series = _recall_series(result)
    assert [k for k, _ in series["image"]] == [1, 2, 5]
    assert [k for k, _ in series["text"]] == [1, 2, 5, 10]
    for side in ("image", "text"):
        for (k, got), (k_want, want) in zip(series[side], expected[side], strict=True):
            assert k == k_want and got == pytest.approx(want, abs=1e-12)
    # The Ks come out in numeric order whatever the metrics' order (K=10 after K=2, not before).
    shuffled = dict(reversed(list(result["metrics"].items())))
    assert _recall_series(shuffled) == series


def test_recall_curve_draws_the_series_and_notes_what_it_left_out(retrieval_case, tmp_path):
    result, expected = retrieval_case
    ax = _plot_recall(result, tmp_path / "r.png").axes[0]
    assert_png(tmp_path / "r.png")
    drawn = {line.get_label(): list(zip(line.get_xdata(), line.get_ydata())) for line in ax.lines}
    assert len(drawn) == 2
    for side, label in (("image", "image retrieval (caption → image)"),
                        ("text", "text retrieval (image → caption)")):
        assert [k for k, _ in drawn[label]] == [k for k, _ in expected[side]]
        np.testing.assert_allclose([v for _, v in drawn[label]], [v for _, v in expected[side]], atol=1e-12)
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "5", "10"]
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_ylim() == (0, 1.05)
    assert "left out: image @10" in ax.get_title()
    assert {t.get_text() for t in ax.get_legend().get_texts()} == set(drawn)


def test_write_report_links_the_recall_curve(retrieval_case, tmp_path):
    result, _ = retrieval_case
    files = write_report([classification_result(), result], tmp_path / "eval.json")
    kinds = [p.name.rsplit("-", 1)[1] for p in files.figures]
    assert kinds == ["confusion.png", "per_class.png", "recall.png"]
    recall = files.figures[2]
    assert recall.name == "eval-1-captions-mini-tiny-recall.png"
    assert_png(recall)
    md = files.markdown.read_text()
    assert f"]({recall.name})" in md
    assert "left out: image @10." in md  # the n/a K is named beside the figure


def test_recall_curve_with_every_value_not_applicable(tmp_path):
    r = results_json("pair", "tiny", "zeroshot_retrieval",
                     {"image_retrieval_recall@5": float("nan"), "text_retrieval_recall@5": float("nan")})
    assert _recall_series(r) == {"image": [], "text": []}
    ax = _plot_recall(r, tmp_path / "r.png").axes[0]
    assert not ax.lines and "no recall@K applies" in [t.get_text() for t in ax.texts]
    assert_png(tmp_path / "r.png")
    # A retrieval result without any recall@K metric gets no curve at all.
    other = results_json("pair", "tiny", "zeroshot_retrieval", {"mean_rank": 2.0})
    assert write_report([other], tmp_path / "e.json").figures == ()


# --- per-class base vs fine-tuned ------------------------------------------------------------------


def labels_top_down(ax) -> list[str]:
    """The y tick labels as a reader sees them, from the top of the chart down."""
    return [t.get_text() for _, t in sorted(zip(ax.get_yticks(), ax.get_yticklabels()), key=lambda p: -p[0])]


def class_pair(names, base_acc, tuned_acc, tuned_order=None):
    """Base and fine-tuned zero-shot results; the fine-tuned one lists its classes in `tuned_order`."""
    order = list(range(len(names))) if tuned_order is None else tuned_order
    base = results_json("pets", "base", "zeroshot_classification", {"acc1": 0.5},
                        class_names=names, per_class=base_acc)
    tuned = results_json("pets", "tuned", "zeroshot_classification", {"acc1": 0.6},
                         class_names=[names[i] for i in order], per_class=[tuned_acc[i] for i in order])
    return base, tuned


NAMES = ["cat", "dog", "hamster", "parrot", "rabbit"]
BASE = [0.5, 0.25, float("nan"), 0.75, 0.5]
TUNED = [0.75, 0.0, 0.5, 0.625, 0.5]


def test_per_class_delta_matches_classes_by_name(tmp_path):
    base, tuned = class_pair(NAMES, BASE, TUNED, tuned_order=[4, 2, 0, 3, 1])
    want = {n: (None if np.isnan(b) else t - b) for n, b, t in zip(NAMES, BASE, TUNED)}
    assert _per_class_delta(base, tuned) == want
    files = write_comparison(base, tuned, tmp_path / "cmp.json")
    assert strict_json(files.json)["per_class_delta"] == want
    # Most improved first, most hurt last; hamster (no base samples) left out; ties keep class order.
    moves = _per_class_moves(base, tuned)
    assert [m[0] for m in moves] == ["cat", "rabbit", "parrot", "dog"]
    assert [m[3] for m in moves] == [0.25, 0.0, -0.125, -0.25]

    assert [p.name for p in files.figures] == ["cmp.png", "cmp-per_class.png"]
    assert_png(files.figures[1])
    md = files.markdown.read_text()
    assert "](cmp-per_class.png)" in md
    rows = [line for line in md.splitlines() if re.match(r"\| (cat|dog|parrot|rabbit|hamster) \|", line)]
    assert rows == ["| cat | 0.5000 | 0.7500 | +0.2500 |", "| rabbit | 0.5000 | 0.5000 | +0.0000 |",
                    "| parrot | 0.7500 | 0.6250 | -0.1250 |", "| dog | 0.2500 | 0.0000 | -0.2500 |"]
    assert "1 class without samples on a side left out" in md


def test_per_class_chart_orders_by_change_and_shows_both_sides(tmp_path):
    base, tuned = class_pair(NAMES, BASE, TUNED)
    ax = _plot_per_class_compare(base, tuned, "t", tmp_path / "p.png").axes[0]
    # Read top-down, from the most improved class to the most hurt.
    assert labels_top_down(ax) == ["cat (+0.25)", "rabbit (+0.00)", "parrot (-0.12)", "dog (-0.25)"]
    bars = sorted(ax.patches, key=lambda b: -b.get_y())  # top first
    widths = [b.get_width() for b in bars]
    assert widths == [0.5, 0.75, 0.5, 0.5, 0.75, 0.625, 0.25, 0.0]  # base above fine-tuned, per class
    assert [t.get_text() for t in ax.figure.legends[0].get_texts()] == ["base", "fine-tuned"]
    assert ax.get_xlabel() and "without samples" in ax.get_title()


def test_more_than_50_classes_shows_the_25_most_improved_and_25_most_hurt(tmp_path):
    c = 80
    names = [f"class {i:02d}" for i in range(c)]
    rng = np.random.default_rng(0)
    base_acc = rng.uniform(0.2, 0.8, c)
    tuned_acc = np.clip(base_acc + rng.permutation(np.linspace(-0.2, 0.2, c)), 0, 1)
    base, tuned = class_pair(names, base_acc, tuned_acc, tuned_order=list(rng.permutation(c)))
    delta = {n: t - b for n, b, t in zip(names, base_acc, tuned_acc)}
    ranked = sorted(names, key=lambda n: -delta[n])
    files = write_comparison(base, tuned, tmp_path / "cmp.json")
    saved = strict_json(files.json)["per_class_delta"]
    assert saved.keys() == delta.keys()
    for n in names:
        assert saved[n] == pytest.approx(delta[n], abs=1e-12)

    ax = _plot_per_class_compare(base, tuned, "t", tmp_path / "p.png").axes[0]
    assert [t.rsplit(" (", 1)[0] for t in labels_top_down(ax)] == ranked[:25] + ranked[-25:]
    assert len(ax.patches) == 100
    assert "the 25 most improved and 25 most hurt of 80 shown" in ax.get_title()
    assert "30 classes in between not shown" in [t.get_text() for t in ax.texts]
    assert_png(files.figures[1])

    md = files.markdown.read_text()
    table = [line.split(" | ")[0][2:] for line in md.splitlines() if line.startswith("| class ")]
    assert table[1:] == ranked[:10] + ranked[-10:]  # [0] is the header row
    assert "| … | | | |" in md and "10 most improved and 10 most hurt of 80" in md


def test_mismatched_class_names_are_refused_naming_both_lists(tmp_path):
    base, _ = class_pair(["cat", "dog", "parrot"], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    tuned = results_json("pets", "tuned", "zeroshot_classification", {"acc1": 0.6},
                         class_names=["cat", "dog", "budgie"], per_class=[0.5, 0.5, 0.5])
    with pytest.raises(DataError) as err:
        write_comparison(base, tuned, tmp_path / "cmp.json")
    message = str(err.value)
    assert "only in base: ['parrot']" in message and "only in fine-tuned: ['budgie']" in message
    assert "['cat', 'dog', 'parrot']" in message and "['cat', 'dog', 'budgie']" in message
    assert not (tmp_path / "cmp.json").exists()  # refused before anything is written
    three, four = class_pair(["a", "b", "c"], [0.5] * 3, [0.5] * 3)[0], results_json(
        "pets", "t", "zeroshot_classification", {"acc1": 0.5}, per_class=[0.5] * 4)
    with pytest.raises(DataError, match="class names differ"):
        _per_class_delta(three, four)


def test_results_without_per_class_get_no_per_class_chart(tmp_path):
    base = results_json("pets", "base", "linear_probe", {"acc1": 0.5})
    tuned = results_json("pets", "tuned", "linear_probe", {"acc1": 0.75})
    files = write_comparison(base, tuned, tmp_path / "cmp.json")
    assert [p.name for p in files.figures] == ["cmp.png"]
    assert "per_class_delta" not in strict_json(files.json)
    assert "Per class" not in files.markdown.read_text()


# --- run report --------------------------------------------------------------------------------------


def fake_run(root: Path) -> Path:
    root.mkdir(parents=True)
    records = [{"event": "start", "step": 0, "train_samples": 8},
               {"step": 0, "eval": {"val_zero_shot_top1": 0.25}},
               {"step": 1, "loss": 2.0, "lr": 1e-4, "time": 0.0},
               {"step": 2, "loss": 1.5, "lr": 1e-4, "time": 1.0},
               {"step": 2, "eval": {"val_zero_shot_top1": 0.5}}]
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "config.json").write_text(json.dumps({"model": "tiny", "backend": "mlx"}))
    return root


def report_links(markdown: Path) -> list[str]:
    text = markdown.read_text()
    section = text.split("## Evaluation figures", 1)[1]
    return re.findall(r"\]\(([^)]+)\)", section)


def test_run_report_links_the_evaluation_figures_in_the_run(tmp_path):
    run = fake_run(tmp_path / "my run")
    written = write_report([classification_result()], run / "eval" / "eval.json").figures
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(run / "checkpoints" / "step-000002" / "x.png")  # not an evaluation
    report = write_run_report(run)
    assert report.evaluation_figures == sorted(written)
    links = report_links(report.markdown)
    assert len(links) == 2
    for link, png in zip(links, sorted(written)):
        assert not Path(unquote(link)).is_absolute() and " " not in link
        assert (report.markdown.parent / unquote(link)).resolve() == png.resolve()
    # A second report finds neither its own figures nor the first report's.
    again = write_run_report(run, tmp_path / "elsewhere")
    assert again.evaluation_figures == sorted(written)
    for link, png in zip(report_links(again.markdown), sorted(written)):
        assert link.startswith("../my%20run/eval/")
        assert (again.markdown.parent / unquote(link)).resolve() == png.resolve()
    assert evaluation_figures(run, run / "report") == sorted(written)


def test_run_report_without_evaluation_figures_says_so_in_one_line(tmp_path):
    run = fake_run(tmp_path / "run")
    report = write_run_report(run)
    assert report.evaluation_figures == []
    section = report.markdown.read_text().split("## Evaluation figures", 1)[1].strip().splitlines()
    assert len(section) == 1 and section[0].startswith("No evaluation figures under")
    # What the report always had is still there.
    assert [p.name for p in report.figures] == ["training.png", "evaluation.png"]
    assert "| val_zero_shot_top1 | 0.2500 | 0.5000 | 0.5000 (2) |" in report.markdown.read_text()
