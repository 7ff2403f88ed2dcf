"""Domain evaluation, end to end, held to a pipeline built from code we did not write.

Reference: `transformers.CLIPModel.from_pretrained` + `CLIPImageProcessorPil` + `CLIPTokenizer` on
the same folder for the embeddings, then CLIP_benchmark's zero-shot classifier, top-k accuracy and
retrieval recall (ported literally in tests/test_metrics.py) and sklearn's balanced accuracy.
Both engines must give these numbers to 1e-6 absolute. The model is a random tiny CLIP, so its
accuracies are near chance: what is checked is that the numbers are the right ones.
"""

import mlx_clip  # noqa: F401  (first, as everywhere)

import csv
import json
import logging
import re
import shutil
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import balanced_accuracy_score
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from mlx_clip.api import load
from mlx_clip.convert.writer import write_preprocessor_config
from mlx_clip.data.demo import make_demo
from mlx_clip.data.records import load_dataset
from mlx_clip.data.templates import prompt_name
from mlx_clip.errors import DataError
from mlx_clip.evaluation.encode import encode_dataset
from mlx_clip.evaluation.evaluate import compare, evaluate, linear_probe_eval, retrieval, zero_shot
from mlx_clip.model.tokenizer import load_tokenizer
from tests.helpers import save_hf, tiny_hf_clip
from tests.test_metrics import cb_accuracy, cb_retrieval, cb_zero_shot_classifier

TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "art of a {}."]
TOL = 1e-6


# --- shared model and data --------------------------------------------------------------------


def tiny_model_folder(folder: Path, seed: int = 0) -> Path:
    """A random tiny CLIP saved by transformers, with tokenizer and preprocessor files."""
    save_hf(tiny_hf_clip(seed), folder)
    load_tokenizer().save_pretrained(folder)
    write_preprocessor_config(folder, 32)
    return folder


def perturbed_copy(src: Path, dst: Path, seed: int = 1, scale: float = 0.5) -> Path:
    """A stand-in for a fine-tuned model: every float tensor plus noise of `scale` x its std."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    rng = np.random.default_rng(seed)
    tensors = load_file(src / "model.safetensors")
    for name, t in tensors.items():
        if np.issubdtype(t.dtype, np.floating) and t.size > 1:
            noise = rng.normal(0, scale * (float(t.std()) or 0.02), size=t.shape)
            tensors[name] = (t + noise).astype(t.dtype)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def small_demo(root: Path) -> dict[str, Path]:
    return make_demo(root, image_size=16, per_class_train=3, per_class_val=3, per_class_control=2)


def multi_caption_csv(demo: dict[str, Path], path: Path) -> Path:
    """Two captions per target val image (the demo's, and one naming the class): retrieval with
    several positives per image, as CLIP_benchmark's COCO/Flickr protocol has."""
    rows = []
    with open(demo["captions_val"], newline="") as f:
        for row in csv.DictReader(f):
            image = (demo["target"] / row["image"]).as_posix()
            rows += [(image, row["caption"]), (image, f"a picture of a {prompt_name(Path(image).parent.name)}")]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("image", "caption"))
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    demo = small_demo(root / "demo")
    model = tiny_model_folder(root / "tiny")
    return {"root": root, "demo": demo, "model": model,
            "captions": multi_caption_csv(demo, root / "captions.csv")}


@pytest.fixture(scope="module")
def clips(setup):
    return {backend: load(setup["model"], backend) for backend in ("mlx", "torch")}


# --- the reference pipeline -------------------------------------------------------------------


def _features(out) -> torch.Tensor:
    return getattr(out, "pooler_output", out)


@torch.no_grad()
def hf_embeddings(folder: Path, image_paths, texts) -> tuple[np.ndarray, np.ndarray]:
    import transformers
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    model = transformers.CLIPModel.from_pretrained(folder).eval()
    processor = CLIPImageProcessorPil.from_pretrained(folder)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    images = [Image.open(p).convert("RGB") for p in image_paths]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    img = _features(model.get_image_features(pixel_values=pixels))
    tok = tokenizer(list(texts), padding="max_length", max_length=77, return_tensors="pt")
    txt = _features(model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]))
    norm = lambda x: (x / x.norm(dim=-1, keepdim=True)).numpy()  # noqa: E731
    return norm(img), norm(txt)


def reference_probe_acc1(setup, result: dict) -> float:
    """The probe's final fit redone on transformers' features: scikit-learn's L-BFGS logistic
    regression at the L2 strength the sweep chose, on the seeded train+val split, scored on val/.
    One test image of 36 may fall the other way on a near tie (features agree to ~1e-6)."""
    from sklearn.linear_model import LogisticRegression

    from mlx_clip.data.records import load_dataset, split_samples

    dataset = load_dataset(setup["demo"]["target"], templates=TEMPLATES)
    fit, val = split_samples(dataset.samples, 0.2, 0)
    train_x, _ = hf_embeddings(setup["model"], [s.image for s in fit + val], ["unused"])
    test_x, _ = hf_embeddings(setup["model"], [s.image for s in dataset.val], ["unused"])
    probe = LogisticRegression(C=1.0 / result["reg"], max_iter=1000, random_state=0)
    probe.fit(train_x, [s.label for s in fit + val])
    return float(np.mean(probe.predict(test_x) == np.array([s.label for s in dataset.val])))


def reference_zero_shot(folder: Path, dataset) -> dict:
    samples = dataset.val
    names = dataset.class_names
    prompts = [t.format(prompt_name(c)) for c in names for t in TEMPLATES]
    img, txt = hf_embeddings(folder, [s.image for s in samples], prompts)
    classifier = cb_zero_shot_classifier(txt.reshape(len(names), len(TEMPLATES), -1))  # (D, C)
    logits = 100.0 * torch.from_numpy(img) @ classifier
    target = torch.tensor([s.label for s in samples])
    acc1, acc5 = cb_accuracy(logits, target, topk=(1, 5))
    pred = logits.argmax(dim=1).numpy()
    mpcr = balanced_accuracy_score(target.numpy(), pred)
    cm = sk_confusion_matrix(target.numpy(), pred, labels=np.arange(len(names)))
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": mpcr, "confusion_matrix": cm.tolist()}


def reference_retrieval(folder: Path, captions: Path) -> dict:
    rows = list(csv.DictReader(open(captions, newline="")))
    images = list(dict.fromkeys(r["image"] for r in rows))
    img, txt = hf_embeddings(folder, images, [r["caption"] for r in rows])
    t2i = np.array([images.index(r["image"]) for r in rows])
    return cb_retrieval(img, txt, t2i, [1, 5, 10])


# --- engines vs reference ---------------------------------------------------------------------


def test_zero_shot_both_engines_equal_the_transformers_clip_benchmark_reference(setup, clips):
    dataset = load_dataset(setup["demo"]["target"], templates=TEMPLATES)
    expected = reference_zero_shot(setup["model"], dataset)
    got = {b: zero_shot(clip, dataset) for b, clip in clips.items()}
    for backend, metrics in got.items():
        for key in ("acc1", "acc5", "mean_per_class_recall"):
            assert abs(metrics[key] - expected[key]) <= TOL, (backend, key, metrics[key], expected[key])
        # A random CLIP predicts a few classes for everything, so accuracies alone say little:
        # every image's predicted class must be the reference's.
        assert metrics["confusion_matrix"] == expected["confusion_matrix"]
        assert metrics["images"] == 36 and metrics["unreadable_images"] == 0
        assert metrics["class_names"] == dataset.class_names
    assert got["mlx"]["per_class"] == got["torch"]["per_class"]


def test_retrieval_with_two_captions_per_image_equals_reference_on_both_engines(setup, clips):
    dataset = load_dataset(setup["captions"])
    expected = reference_retrieval(setup["model"], setup["captions"])
    assert set(expected) == {f"{side}_retrieval_recall@{k}" for side in ("image", "text") for k in (1, 5, 10)}
    for backend, clip in clips.items():
        metrics = retrieval(clip, dataset)
        assert metrics["images"] == 36 and metrics["captions"] == 72
        for key, value in expected.items():
            assert abs(metrics[key] - value) <= TOL, (backend, key, metrics[key], value)


class CountingCLIP:
    """Wraps a CLIP and counts what reaches the engine."""

    def __init__(self, clip):
        self.clip, self.images, self.texts = clip, 0, 0

    def preprocess(self, images):
        return self.clip.preprocess(images)

    def encode_images(self, pixels, batch_size=64):
        self.images += len(pixels)
        return self.clip.encode_images(pixels, batch_size)

    def encode_texts(self, texts, batch_size=256):
        self.texts += len(texts)
        return self.clip.encode_texts(texts, batch_size)


def test_encode_dataset_encodes_each_shared_image_once(setup, clips):
    samples = load_dataset(setup["captions"]).samples
    counting = CountingCLIP(clips["mlx"])
    enc = encode_dataset(counting, samples, batch_size=5)
    assert counting.images == 36 and counting.texts == 72
    assert enc.image_embeds.shape == (36, 16) and enc.text_embeds.shape == (72, 16)
    assert enc.text_to_image.tolist() == np.repeat(np.arange(36), 2).tolist()
    # Same rows as encoding every distinct image directly, in one batch.
    direct = clips["mlx"].encode_images([samples[i].image for i in range(0, 72, 2)])
    np.testing.assert_allclose(enc.image_embeds, direct, atol=1e-6)


# --- evaluate(): results, reports, control, skipped images ------------------------------------


def test_evaluate_writes_clip_benchmark_results_with_control(setup, tmp_path):
    demo = setup["demo"]
    out = tmp_path / "report"
    results = evaluate(setup["model"], [demo["target"], setup["captions"]], control=demo["control_val"],
                       templates=TEMPLATES, out=out)
    table = [(r["role"], r["task"]) for r in results]
    assert table == [("target", "zeroshot_classification"), ("target", "linear_probe"),
                     ("target", "zeroshot_retrieval"), ("control", "zeroshot_classification")]
    saved = json.loads((out / "eval.json").read_text())
    assert saved == json.loads(json.dumps(results))
    for r in saved:
        assert list(r)[:4] == ["dataset", "model", "task", "metrics"]
    assert set(saved[0]["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert set(saved[2]["metrics"]) == {f"{s}_retrieval_recall@{k}" for s in ("image", "text") for k in (1, 5, 10)}
    assert saved[3]["images"] == 32 and len(saved[3]["class_names"]) == 16
    assert saved[1]["train_images"] + saved[1]["val_images"] == 36
    assert saved[1]["metrics"]["acc1"] == pytest.approx(reference_probe_acc1(setup, saved[1]), abs=1 / 36 + 1e-9)
    md = (out / "eval.md").read_text()
    assert "zeroshot_retrieval" in md and f"{saved[3]['metrics']['acc1']:.4f}" in md
    # confusion + per-class for target and control, the recall@K curve for the captions
    assert sorted(p.name.rsplit("-", 1)[1] for p in out.glob("*.png")) == [
        "confusion.png", "confusion.png", "per_class.png", "per_class.png", "recall.png"]
    assert f"]({next(out.glob('*-recall.png')).name})" in md

    probe = linear_probe_eval(load(setup["model"]), load_dataset(demo["target"]), load_dataset(demo["target"]))
    assert probe == {**results[1]["metrics"], **{k: v for k, v in results[1].items() if k not in
                                                  ("dataset", "model", "task", "metrics", "role")}}

    only = evaluate(setup["model"], demo["target"], tasks="zero_shot", templates=TEMPLATES)
    assert [r["task"] for r in only] == ["zeroshot_classification"]
    assert only[0]["metrics"] == results[0]["metrics"]


def test_unreadable_images_are_skipped_counted_and_logged(setup, clips, tmp_path, caplog):
    clean = tmp_path / "clean"
    shutil.copytree(setup["demo"]["target_val"], clean)
    broken = tmp_path / "broken"
    shutil.copytree(clean, broken)
    (broken / "red_circle" / "9999.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    Image.new("RGB", (4, 4)).save(broken / "blue_square" / "9998.png")
    (broken / "blue_square" / "9998.png").write_bytes((broken / "blue_square" / "9998.png").read_bytes()[:30])
    with caplog.at_level(logging.WARNING, logger="mlx_clip.evaluation.evaluate"):
        got = zero_shot(clips["mlx"], load_dataset(broken, templates=TEMPLATES))
    want = zero_shot(clips["mlx"], load_dataset(clean, templates=TEMPLATES))
    assert got["unreadable_images"] == 2 and got["images"] == 36
    assert any("9999.png" in e for e in got["unreadable_examples"])
    assert "2 of 38 images could not be read" in caplog.text
    for key in ("acc1", "acc5", "mean_per_class_recall", "per_class"):
        assert got[key] == want[key]


def test_compare_writes_the_metric_by_metric_difference(setup, tmp_path):
    tuned = perturbed_copy(setup["model"], tmp_path / "tuned")
    out = tmp_path / "cmp"
    result = compare(setup["model"], tuned, setup["demo"]["target_val"], control=setup["demo"]["control_val"],
                     templates=TEMPLATES, out=out)
    assert len(result.files) == 2
    for base, tuned_r, files in zip(result.base, result.finetuned, result.files):
        saved = json.loads(files.json.read_text())
        for key in ("acc1", "acc5", "mean_per_class_recall"):
            assert saved["delta"][key] == pytest.approx(tuned_r["metrics"][key] - base["metrics"][key], abs=1e-12)
        assert files.figures[0].read_bytes()[:4] == b"\x89PNG"
        # Zero-shot results carry per_class: the per-class chart and the deltas, class by class.
        assert files.figures[1].name == f"{files.json.stem}-per_class.png"
        assert files.figures[1].read_bytes()[:4] == b"\x89PNG"
        names = base["class_names"]
        assert tuned_r["class_names"] == names and list(saved["per_class_delta"]) == names
        for name, b, t in zip(names, base["per_class"], tuned_r["per_class"]):
            want = None if b is None or t is None else pytest.approx(t - b, abs=1e-12)
            assert saved["per_class_delta"][name] == want
    # A random tiny CLIP predicts nearly one class everywhere, so the scores can coincide; which
    # classes it predicts shows that the second model really is another one.
    assert result.base[0]["confusion_matrix"] != result.finetuned[0]["confusion_matrix"]
    md = result.markdown.read_text()
    assert md.count("| metric | base | fine-tuned |") == 2 and "control" in md
    assert (out / "base.json").is_file() and (out / "finetuned.json").is_file()
    # compare.md shows every pair's figures (grouped metrics and per class), by relative links
    # that resolve from its own folder to the files write_comparison wrote.
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert all(not Path(unquote(link)).is_absolute() for link in links)
    linked = [(result.markdown.parent / unquote(link)).resolve() for link in links]
    assert all(p.is_file() for p in linked)
    written = [p.resolve() for files in result.files for p in files.figures]
    assert len(written) == 4 and linked == written


# --- the other layout -------------------------------------------------------------------------


def test_zero_shot_and_retrieval_refuse_the_other_layout(setup, clips):
    with pytest.raises(DataError, match="retrieval needs a captions file"):
        retrieval(clips["mlx"], load_dataset(setup["demo"]["target_val"]))
    with pytest.raises(DataError, match="zero-shot classification needs class folders"):
        zero_shot(clips["mlx"], load_dataset(setup["captions"]))
    with pytest.raises(DataError, match="needs exactly one"):
        zero_shot(clips["mlx"], load_dataset(setup["demo"]["target_val"]), ["no placeholder"])


def test_clip_benchmark_build_tabulates_our_results(setup, tmp_path):
    """The real `clip_benchmark build` reads the per-result files `mlxclip eval` writes."""
    import subprocess
    import sys

    pytest.importorskip("clip_benchmark")
    demo = setup["demo"]
    results = evaluate(setup["model"], [demo["target"], setup["captions"]], templates=TEMPLATES, out=tmp_path / "r")
    folder = tmp_path / "r" / "eval-clip_benchmark"
    files = sorted(folder.glob("*.json"))
    assert len(files) == len(results)
    csv_path = tmp_path / "benchmark.csv"
    done = subprocess.run([sys.executable, "-m", "clip_benchmark.cli", "build", str(folder), "--output", str(csv_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["task"] for r in rows) == sorted(r["task"] for r in results)
    for result in results:
        row = next(r for r in rows if r["task"] == result["task"])
        assert row["model_fullname"] == f"{result['model']} mlxclip"
        for key, value in result["metrics"].items():
            assert float(row[key]) == pytest.approx(value), key
