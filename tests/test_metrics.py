"""Metrics against CLIP_benchmark's definitions, ported literally to torch below, and sklearn.

References: LAION-AI/CLIP_benchmark `clip_benchmark/metrics/zeroshot_classification.py`
(`zero_shot_classifier`, `accuracy`), `zeroshot_retrieval.py` (`recall_at_k`, `batchify`, the
metrics loop), `linear_probe.py` (`balanced_accuracy_score` as mean_per_class_recall).
torch.topk orders ties arbitrarily, so random-data comparisons use continuous random values
(no ties) and tie behaviour is checked on hand-built cases.
"""

import mlx_clip  # noqa: F401  (first, as everywhere)

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from mlx_clip.errors import DataError
from mlx_clip.evaluation.metrics import (
    accuracy_topk,
    build_class_embeds,
    classification_metrics,
    confusion_matrix,
    linear_probe,
    mean_per_class_recall,
    per_class_accuracy,
    retrieval_recall_at_k,
    zero_shot_logits,
)

# --- CLIP_benchmark, ported as written (torch) ------------------------------------------------


def cb_zero_shot_classifier(per_template: np.ndarray) -> torch.Tensor:
    weights = []
    for class_embeddings in torch.from_numpy(per_template):
        class_embedding = F.normalize(class_embeddings, dim=-1).mean(dim=0)
        class_embedding /= class_embedding.norm()
        weights.append(class_embedding)
    return torch.stack(weights, dim=1)  # (D, C)


def cb_accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[float]:
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    # CLIP_benchmark writes float(....sum(0, keepdim=True).cpu().numpy()); numpy 2.4 no longer
    # converts a 1-element 1-D array with float(), so the same value is read with .item().
    return [correct[:k].reshape(-1).float().sum(0, keepdim=True).item() / n for k in topk]


def cb_recall_at_k(scores, positive_pairs, k):
    nb_texts, nb_images = scores.shape
    topk_indices = torch.topk(scores, k, dim=1)[1]
    nb_positive = positive_pairs.sum(dim=1)
    topk_indices_onehot = torch.nn.functional.one_hot(topk_indices, num_classes=nb_images)
    positive_pairs_reshaped = positive_pairs.view(nb_texts, 1, nb_images)
    nb_true_positive = (topk_indices_onehot * positive_pairs_reshaped).sum(dim=(1, 2))
    return nb_true_positive / nb_positive


def cb_batchify(func, X, Y, batch_size, *args, **kwargs):
    return torch.cat([func(X[s:s + batch_size], Y[s:s + batch_size], *args, **kwargs)
                      for s in range(0, len(X), batch_size)])


def cb_retrieval(images_emb, texts_emb, texts_image_index, recall_k_list, batch_size=16):
    images_emb, texts_emb = torch.from_numpy(images_emb), torch.from_numpy(texts_emb)
    scores = texts_emb @ images_emb.t()
    positive_pairs = torch.zeros_like(scores, dtype=bool)
    positive_pairs[torch.arange(len(scores)), torch.from_numpy(texts_image_index)] = True
    metrics = {}
    for recall_k in recall_k_list:
        metrics[f"image_retrieval_recall@{recall_k}"] = (cb_batchify(
            cb_recall_at_k, scores, positive_pairs, batch_size, k=recall_k) > 0).float().mean().item()
        metrics[f"text_retrieval_recall@{recall_k}"] = (cb_batchify(
            cb_recall_at_k, scores.T, positive_pairs.T, batch_size, k=recall_k) > 0).float().mean().item()
    return metrics


def unit(rng, *shape) -> np.ndarray:
    x = rng.normal(size=shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --- zero-shot classification -----------------------------------------------------------------


def test_class_embeds_and_logits_match_clip_benchmark():
    rng = np.random.default_rng(0)
    per_template = rng.normal(size=(10, 4, 16)).astype(np.float32) * 3  # not unit: must normalise
    images = rng.normal(size=(50, 16)).astype(np.float32)
    ref_w = cb_zero_shot_classifier(per_template)
    ours = build_class_embeds(per_template)
    np.testing.assert_allclose(ours, ref_w.T.numpy(), rtol=0, atol=1e-6)
    ref_logits = 100.0 * F.normalize(torch.from_numpy(images), dim=-1) @ ref_w
    np.testing.assert_allclose(zero_shot_logits(images, ours), ref_logits.numpy(), rtol=1e-5, atol=1e-4)
    # Ragged templates per class: each class alone equals the (1, T, D) case.
    ragged = build_class_embeds([per_template[0, :2], per_template[1]])
    np.testing.assert_allclose(ragged[0], build_class_embeds(per_template[:1, :2])[0], atol=1e-7)


def test_accuracy_matches_clip_benchmark_on_random_logits():
    rng = np.random.default_rng(1)
    for n, c in ((200, 10), (33, 7)):
        logits = rng.normal(size=(n, c)).astype(np.float32)
        targets = rng.integers(0, c, size=n)
        ref = cb_accuracy(torch.from_numpy(logits), torch.from_numpy(targets), topk=(1, 5))
        ours = accuracy_topk(logits, targets, ks=(1, 5))
        assert ours == pytest.approx({"acc1": ref[0], "acc5": ref[1]}, abs=1e-12)


def test_accuracy_ties_go_to_lower_class_index_and_k_past_the_classes_is_not_applicable():
    logits = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 2.0, 2.0]], dtype=np.float32)
    targets = np.array([0, 1, 2])
    # Row 0: class 0 wins its tie; row 1: class 1 loses to class 0; row 2: class 2 loses to 1.
    got = accuracy_topk(logits, targets, ks=(1, 2, 3, 5))
    assert got["acc1"] == pytest.approx(1 / 3) and got["acc2"] == 1.0
    # k >= C: every target is in the top k whatever the logits, so the score says nothing.
    assert np.isnan(got["acc3"]) and np.isnan(got["acc5"])


def cb_single_label_metrics(logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> dict:
    """CLIP_benchmark's `zeroshot_classification.evaluate`, single-label branch, as written."""
    pred = logits.argmax(axis=1)
    if num_classes >= 5:
        acc1, acc5 = cb_accuracy(logits, target, topk=(1, 5))
    else:
        acc1, = cb_accuracy(logits, target, topk=(1,))
        acc5 = float("nan")
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": balanced_accuracy_score(target, pred)}


@pytest.mark.parametrize("c", [2, 3, 4, 6])
def test_fewer_classes_than_five_give_nan_top5_as_clip_benchmark(c):
    rng = np.random.default_rng(c)
    logits = rng.normal(size=(40, c)).astype(np.float32)
    targets = rng.integers(0, c, size=40)
    ref = cb_single_label_metrics(torch.from_numpy(logits), torch.from_numpy(targets), c)
    assert classification_metrics(logits, targets) == pytest.approx(ref, abs=1e-12, nan_ok=True)


def test_top5_of_exactly_five_classes_is_not_applicable():
    # CLIP_benchmark computes it (= 1.0 for any model); here k >= C is n/a, as for C < 5.
    logits = np.random.default_rng(0).normal(size=(10, 5)).astype(np.float32)
    assert np.isnan(accuracy_topk(logits, np.arange(10) % 5)["acc5"])


def test_per_class_recall_and_confusion_match_sklearn_with_empty_classes():
    # 4 classes; class 2 has no sample but is predicted once; class 3 is never predicted.
    targets = np.array([0, 0, 0, 1, 1, 3])
    preds = np.array([0, 0, 1, 1, 2, 0])
    logits = np.eye(4, dtype=np.float32)[preds]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn: "y_pred contains classes not in y_true"
        ref = balanced_accuracy_score(targets, preds)
    assert ref == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert mean_per_class_recall(logits, targets) == pytest.approx(ref, abs=1e-12)
    np.testing.assert_array_equal(confusion_matrix(logits, targets),
                                  sk_confusion_matrix(targets, preds, labels=range(4)))
    np.testing.assert_allclose(per_class_accuracy(logits, targets), [2 / 3, 0.5, np.nan, 0.0])
    assert set(classification_metrics(logits, targets)) == {"acc1", "acc5", "mean_per_class_recall"}


def test_mean_per_class_recall_matches_sklearn_on_random_logits():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(300, 12)).astype(np.float32)
    targets = rng.integers(0, 12, size=300)
    ref = balanced_accuracy_score(targets, logits.argmax(1))
    assert mean_per_class_recall(logits, targets) == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("call, match", [
    (lambda: accuracy_topk(np.zeros((3, 4), np.float32), np.array([0, 1, 4])), r"targets\[2\] = 4"),
    (lambda: accuracy_topk(np.zeros((3, 4), np.float32), np.array([0, 1])), "shape"),
    (lambda: accuracy_topk(np.zeros((0, 4), np.float32), np.array([], int)), "empty"),
    (lambda: accuracy_topk(np.zeros((2, 4), np.float32), np.array([0.0, 1.0])), "integer"),
    (lambda: accuracy_topk(np.zeros((2, 4), np.float32), np.array([0, 1]), ks=(0,)), "positive"),
    (lambda: zero_shot_logits(np.ones((2, 4), np.float32), np.ones((3, 5), np.float32)), "width"),
    (lambda: build_class_embeds(np.zeros((2, 3, 4), np.float32)), "all-zero"),
    (lambda: accuracy_topk(np.full((1, 2), np.nan, np.float32), np.array([0])), "NaN"),
    (lambda: accuracy_topk(np.ones((3, 1), np.float32), np.zeros(3, int)), "at least 2 classes, got 1"),
    (lambda: classification_metrics(np.ones((3, 1), np.float32), np.zeros(3, int)), "at least 2 classes"),
])
def test_bad_classification_inputs_raise_data_error(call, match):
    with pytest.raises(DataError, match=match):
        call()


# --- retrieval --------------------------------------------------------------------------------


def test_retrieval_hand_built_several_captions_and_ties():
    # Exactly representable dot products, so ties are real ties.
    images = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32)
    texts = np.array([[1, 0], [0, 1], [0.5, 1], [1, 0.5], [0, 1]], dtype=np.float32)
    t2i = np.array([0, 0, 1, 2, 1])
    # Image rank per text: T0 ties I0/I2 -> I0 first (0); T1 -> 2; T2 -> 1; T3 -> 0; T4 -> 0.
    # Best own-text rank per image: I0 via T0 (ties T3, lower index) 0; I1 via T2 behind T1 -> 1;
    # I2 via T3 behind T2 (tie at 1.5, lower index) -> 1.
    got = retrieval_recall_at_k(images, texts, t2i, ks=(1, 2, 3, 10))
    nan = float("nan")
    # Not applicable (NaN) where every query is a hit whatever the scores: image side k >= 3
    # images; text side k > 5 texts - 1 (the fewest captions of an image).
    assert got == pytest.approx({
        "image_retrieval_recall@1": 3 / 5, "text_retrieval_recall@1": 1 / 3,
        "image_retrieval_recall@2": 4 / 5, "text_retrieval_recall@2": 1.0,
        "image_retrieval_recall@3": nan, "text_retrieval_recall@3": 1.0,
        "image_retrieval_recall@10": nan, "text_retrieval_recall@10": nan,
    }, nan_ok=True)


def test_retrieval_recall_is_not_applicable_only_when_every_query_must_hit():
    rng = np.random.default_rng(8)
    images, texts = unit(rng, 4, 8), unit(rng, 8, 8)
    t2i = np.array([0, 0, 0, 1, 1, 2, 3, 3])  # 8 texts; the fewest captions of an image: 1
    got = retrieval_recall_at_k(images, texts, t2i, ks=(3, 4, 7, 8))
    assert not np.isnan(got["image_retrieval_recall@3"]) and np.isnan(got["image_retrieval_recall@4"])
    assert not np.isnan(got["text_retrieval_recall@7"]) and np.isnan(got["text_retrieval_recall@8"])
    # Several captions for every image: a hit is certain sooner (8 texts, at least 2 each -> k > 6).
    t2i = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    got = retrieval_recall_at_k(images, texts, t2i, ks=(6, 7))
    assert not np.isnan(got["text_retrieval_recall@6"]) and np.isnan(got["text_retrieval_recall@7"])


def test_retrieval_matches_clip_benchmark_on_random_embeddings():
    rng = np.random.default_rng(3)
    n, d = 40, 16
    counts = rng.integers(1, 6, size=n)  # 1..5 captions per image
    t2i = rng.permutation(np.repeat(np.arange(n), counts))
    images = unit(rng, n, d)
    texts = unit(rng, len(t2i), d) + 0.8 * images[t2i]  # some signal, so recalls sit mid-range
    ks = (1, 5, 10)
    ref = cb_retrieval(images, texts, t2i, ks)
    ours = retrieval_recall_at_k(images, texts, t2i, ks)
    assert 0.05 < ours["image_retrieval_recall@1"] < 0.95
    assert ours == pytest.approx(ref, abs=1e-6)  # torch averages in float32


def test_retrieval_blocks_equal_unblocked():
    rng = np.random.default_rng(4)
    t2i = rng.permutation(np.repeat(np.arange(60), 3))
    images, texts = unit(rng, 60, 8), unit(rng, 180, 8)
    whole = retrieval_recall_at_k(images, texts, t2i, block_size=10**6)
    for block in (1, 7, 64):
        assert retrieval_recall_at_k(images, texts, t2i, block_size=block) == whole


@pytest.mark.parametrize("t2i, match", [
    (np.array([0, 0, 1]), "image 2 has no text"),
    (np.array([0, 1, 3]), r"text_to_image\[2\] = 3"),
    (np.array([0, 1]), "shape"),
])
def test_bad_retrieval_inputs_raise_data_error(t2i, match):
    with pytest.raises(DataError, match=match):
        retrieval_recall_at_k(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32), t2i)


def test_retrieval_over_one_image_is_refused():
    with pytest.raises(DataError, match="at least 2 images, got 1"):
        retrieval_recall_at_k(np.ones((1, 3), np.float32), np.ones((2, 3), np.float32), np.array([0, 0]))


# --- linear probe -----------------------------------------------------------------------------


def _split(x, y):
    return x[:240], y[:240], x[240:320], y[240:320], x[320:], y[320:]


def test_linear_probe_separable_data_and_sklearn_agreement():
    rng = np.random.default_rng(5)
    c, d = 6, 12
    means = rng.normal(size=(c, d)) * 4
    y = rng.integers(0, c, size=480)
    x = (means[y] + rng.normal(size=(480, d))).astype(np.float32)
    res = linear_probe(*_split(x, y), seed=0)
    assert res["acc1"] >= 0.95 and res["acc5"] == 1.0 and res["mean_per_class_recall"] >= 0.95
    # The reported numbers are sklearn's own on the chosen strength, refit on train+val.
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    clf = LogisticRegression(C=1 / res["reg"], max_iter=1000, random_state=0).fit(xn[:320], y[:320])
    assert res["acc1"] == pytest.approx(clf.score(xn[320:], y[320:]), abs=1e-12)
    assert res["mean_per_class_recall"] == pytest.approx(
        balanced_accuracy_score(y[320:], clf.predict(xn[320:])), abs=1e-12)
    assert max(res["val_acc1_by_reg"].values()) == res["val_acc1_by_reg"][f"{res['reg']:g}"]


def test_linear_probe_random_labels_is_at_chance():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(480, 12)).astype(np.float32)
    y = rng.integers(0, 4, size=480)
    res = linear_probe(*_split(x, y), regs=(0.1, 10.0))
    assert abs(res["acc1"] - 0.25) < 0.1  # 160 test samples: chance 0.25, std ~0.034


def test_linear_probe_rejects_classes_unseen_in_train():
    x = np.random.default_rng(7).normal(size=(12, 3)).astype(np.float32)
    y = np.array([0, 1, 0, 1, 0, 1, 2, 0, 1, 0, 1, 0])
    with pytest.raises(DataError, match=r"val_labels contain classes \[2\]"):
        linear_probe(x[:6], y[:6], x[6:9], y[6:9], x[9:], y[9:], regs=(1.0,))


def test_linear_probe_on_three_classes_reports_top5_not_applicable():
    # CLIP_benchmark's linear_probe: acc5 = NaN unless test labels reach class 5.
    rng = np.random.default_rng(9)
    means = rng.normal(size=(3, 6)) * 4
    y = np.arange(480) % 3
    x = (means[y] + rng.normal(size=(480, 6))).astype(np.float32)
    res = linear_probe(*_split(x, y), regs=(1.0,))
    assert np.isnan(res["acc5"]) and res["acc1"] >= 0.9


def test_linear_probe_counts_the_classes_it_was_fit_on():
    # Labels 0 and 7 only: 8 columns, but the 6 classes never fit always rank last, so with 2 real
    # candidates top-5 is certain whatever the features.
    rng = np.random.default_rng(10)
    y = np.where(np.arange(480) % 2 == 0, 0, 7)
    x = (np.eye(8)[y] * 3 + rng.normal(size=(480, 8))).astype(np.float32)
    res = linear_probe(*_split(x, y), regs=(1.0,))
    assert res["acc1"] >= 0.9 and np.isnan(res["acc5"])
