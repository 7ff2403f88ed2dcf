"""Evaluation metrics on frozen embeddings, numpy only, with CLIP_benchmark's definitions.

Ported from LAION-AI/CLIP_benchmark (`clip_benchmark/metrics/`):

- `zeroshot_classification.py`: the prompt-ensembled classifier (`zero_shot_classifier`), top-k
  `accuracy`, and `mean_per_class_recall` = sklearn's `balanced_accuracy_score` of the argmax;
- `zeroshot_retrieval.py`: `image_retrieval_recall@k` / `text_retrieval_recall@k` with several
  captions per image (`recall_at_k(...) > 0`, averaged over queries);
- `linear_probe.py`: logistic regression on frozen features, L2 strength chosen on a validation
  split, refit on train+val, test acc1/acc5/mean_per_class_recall.

Not applicable. A top-k score over k or fewer candidates is 1.0 whatever the model: acc@k for
k >= C classes, image recall@k for k >= N images, text recall@k once k exceeds the texts that can
rank ahead of an image's own. Such a score is NaN here, as CLIP_benchmark writes acc5 for fewer
than 5 classes (it computes acc5 at exactly 5 classes, always 1.0; here that is NaN too). Fewer
than 2 candidates leave nothing to rank and are refused: `TooFewClassesError`, or a `DataError`
for retrieval over one image.

Ties. CLIP_benchmark ranks with `torch.topk`, whose order among equal scores is unspecified. Here
every ranking is deterministic: candidates are ordered by descending score, and equal scores by
ascending index (class index, image index, text index). A query is a hit at k when fewer than k
candidates come before its positive in that order. Ranks are counted, never sorted, so a block of
queries costs O(block x candidates) memory and time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mlx_clip.errors import DataError

__all__ = [
    "MIN_CLASSES",
    "TooFewClassesError",
    "accuracy_topk",
    "build_class_embeds",
    "check_num_classes",
    "classification_metrics",
    "confusion_matrix",
    "linear_probe",
    "mean_per_class_recall",
    "per_class_accuracy",
    "retrieval_recall_at_k",
    "zero_shot_logits",
]

DEFAULT_REGS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
MIN_CLASSES = 2  # with one class every prediction is right: there is nothing to measure


class TooFewClassesError(DataError):
    """Classification over fewer than `MIN_CLASSES` classes. `source` names the data (or the
    array), `num_classes` is the count found."""

    def __init__(self, message: str, *, source: str = "", num_classes: int = 0):
        super().__init__(message)
        self.source, self.num_classes = source, num_classes


def check_num_classes(num_classes: int, source: str, task: str = "classification") -> None:
    """Raise `TooFewClassesError` ("<source>: <task> needs at least 2 classes, got N") when N < 2."""
    if num_classes < MIN_CLASSES:
        raise TooFewClassesError(
            f"{source}: {task} needs at least {MIN_CLASSES} classes, got {num_classes}; "
            "with fewer, every image is classified right whatever the model",
            source=str(source), num_classes=num_classes)


# --- input checks -----------------------------------------------------------------------------


def _matrix(x: np.ndarray, name: str, ndim: int = 2) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != ndim:
        raise DataError(f"{name} must have {ndim} dimensions, got shape {x.shape}")
    if x.size == 0 or x.shape[0] == 0:
        raise DataError(f"{name} is empty (shape {x.shape})")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{name} contains NaN or infinite values")
    return x


def _labels(y: np.ndarray, name: str, n: int, num_classes: int | None = None) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != n:
        raise DataError(f"{name} must have shape ({n},), got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{name} must hold integer indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    bad = (y < 0) if num_classes is None else (y < 0) | (y >= num_classes)
    if bad.any():
        i = int(np.argmax(bad))
        rule = ("indices start at 0" if num_classes is None
                else f"every index must name one of the {num_classes} candidates")
        bound = "[0, ...)" if num_classes is None else f"[0, {num_classes})"
        raise DataError(f"{name}[{i}] = {int(y[i])} is outside {bound} ({rule})")
    return y


def _ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise DataError(f"ks must be a non-empty list of positive integers, got {ks}")
    return tuple(int(k) for k in ks)


def _l2_normalize(x: np.ndarray, name: str, axis: int = -1) -> np.ndarray:
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    if (norm == 0).any():
        raise DataError(f"{name} has an all-zero embedding, which cannot be L2-normalised")
    return x / norm


def _rank_of(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Rank (0 = first) of column `positive[r]` in row r: higher score first, then lower index."""
    pos = scores[np.arange(scores.shape[0]), positive][:, None]
    ahead = (scores > pos) | ((scores == pos) & (np.arange(scores.shape[1]) < positive[:, None]))
    return ahead.sum(axis=1)


# --- zero-shot classification -----------------------------------------------------------------


def build_class_embeds(per_template_text_embeds: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """(C, T, D) text embeddings, one per class and prompt template -> (C, D) unit vectors.

    Prompt ensembling as CLIP and CLIP_benchmark's `zero_shot_classifier`: L2-normalise each
    template's embedding, average over templates, L2-normalise the mean. A sequence of (T_c, D)
    arrays is accepted too, for classes with their own number of templates.
    """
    if isinstance(per_template_text_embeds, np.ndarray):
        per_class = list(_matrix(per_template_text_embeds, "per_template_text_embeds", ndim=3))
    else:
        per_class = [_matrix(e, f"per_template_text_embeds[{c}]")
                     for c, e in enumerate(per_template_text_embeds)]
        if not per_class:
            raise DataError("per_template_text_embeds is empty (no classes)")
        dims = {e.shape[1] for e in per_class}
        if len(dims) != 1:
            raise DataError(f"per_template_text_embeds: classes have different widths {sorted(dims)}")
    means = np.stack([
        _l2_normalize(e, f"text embeddings of class {c}").mean(axis=0)
        for c, e in enumerate(per_class)
    ])
    return _l2_normalize(means, "the template mean of a class")  # (C, D)


def zero_shot_logits(
    image_embeds: np.ndarray, class_embeds: np.ndarray, *, scale: float = 100.0
) -> np.ndarray:
    """(N, D) image embeddings x (C, D) class embeddings -> (N, C) logits.

    CLIP_benchmark's `run_classification`: `100 * normalize(image) @ classifier`. Both sides are
    normalised here (a no-op for `build_class_embeds` output), so raw embeddings give cosine
    logits too. The scale changes no ranking; it only makes the logits look like CLIP's.
    """
    img = _matrix(image_embeds, "image_embeds")
    cls = _matrix(class_embeds, "class_embeds")
    if img.shape[1] != cls.shape[1]:
        raise DataError(
            f"image_embeds width {img.shape[1]} differs from class_embeds width {cls.shape[1]}"
        )
    img = _l2_normalize(img, "image_embeds")
    cls = _l2_normalize(cls, "class_embeds")
    return scale * (img @ cls.T)


def _logits_targets(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits = _matrix(logits, "logits")
    return logits, _labels(targets, "targets", logits.shape[0], num_classes=logits.shape[1])


def accuracy_topk(
    logits: np.ndarray, targets: np.ndarray, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """{"acc1": ..., "acc5": ...}: fraction of samples whose target is among the top-k classes.

    CLIP_benchmark's `accuracy` (`topk` then `correct[:k].sum() / n`). For k >= C classes every
    target is in the top k, so acc@k is NaN (not applicable), as CLIP_benchmark's acc5 for C < 5.
    Fewer than 2 classes raise `TooFewClassesError`.
    Ties: equal logits rank by ascending class index (see the module docstring).
    """
    logits, targets = _logits_targets(logits, targets)
    ks = _ks(ks)
    c = logits.shape[1]
    check_num_classes(c, f"logits of shape {logits.shape}")
    rank = _rank_of(logits, targets)
    return {f"acc{k}": float(np.mean(rank < k)) if k < c else float("nan") for k in ks}


def confusion_matrix(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(C, C) int64 counts: row = true class, column = predicted class (argmax, lowest index on ties)."""
    logits, targets = _logits_targets(logits, targets)
    c = logits.shape[1]
    pred = np.argmax(logits, axis=1)
    return np.bincount(targets * c + pred, minlength=c * c).reshape(c, c).astype(np.int64)


def per_class_accuracy(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(C,) top-1 accuracy within each true class (= per-class recall); NaN for a class with no samples."""
    cm = confusion_matrix(logits, targets)
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / support, np.nan)


def mean_per_class_recall(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean of per-class recall over the classes that have samples.

    CLIP_benchmark's `mean_per_class_recall` is sklearn's `balanced_accuracy_score(target,
    argmax)`, which drops classes absent from `target` (their recall is 0/0); so does this.
    A class with samples that is never predicted counts as recall 0.
    """
    return float(np.nanmean(per_class_accuracy(logits, targets)))


def classification_metrics(
    logits: np.ndarray, targets: np.ndarray, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """CLIP_benchmark's single-label result: {"acc1", "acc5", "mean_per_class_recall"}."""
    out = accuracy_topk(logits, targets, ks)
    out["mean_per_class_recall"] = mean_per_class_recall(logits, targets)
    return out


# --- retrieval --------------------------------------------------------------------------------


def retrieval_recall_at_k(
    image_embeds: np.ndarray,
    text_embeds: np.ndarray,
    text_to_image: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    *,
    block_size: int = 512,
) -> dict[str, float]:
    """Recall@k both ways, several captions per image, scores = dot products.

    As CLIP_benchmark's `zeroshot_retrieval.evaluate` (pass L2-normalised embeddings, as it does):
    - `image_retrieval_recall@k`: over texts, is the text's image among its top-k images;
    - `text_retrieval_recall@k`: over images, is any of the image's texts among its top-k texts.
    A recall every query reaches whatever the scores is NaN (not applicable): image side k >= N;
    text side k > M - (fewest texts of an image). CLIP_benchmark's `topk` fails for k past the
    candidates. At least 2 images are needed, and every image needs at least one text
    (CLIP_benchmark would count a captionless image as a miss through a 0/0 recall).
    Queries are scored `block_size` rows at a time: memory O(block_size x max(N, M)).
    """
    img = _matrix(image_embeds, "image_embeds")
    txt = _matrix(text_embeds, "text_embeds")
    if img.shape[1] != txt.shape[1]:
        raise DataError(f"image_embeds width {img.shape[1]} differs from text_embeds width {txt.shape[1]}")
    n, m = img.shape[0], txt.shape[0]
    if n < 2:
        raise DataError(f"retrieval needs at least 2 images, got {n}; with one, every query "
                        "finds it whatever the model")
    t2i = _labels(text_to_image, "text_to_image", m, num_classes=n)
    ks = _ks(ks)
    if block_size < 1:
        raise DataError(f"block_size must be >= 1, got {block_size}")
    per_image = np.bincount(t2i, minlength=n)
    captioned = per_image > 0
    if not captioned.all():
        raise DataError(
            f"image {int(np.argmin(captioned))} has no text in text_to_image: "
            "text retrieval recall is undefined for an image without captions"
        )

    image_rank = np.empty(m, dtype=np.int64)  # per text: rank of its image among all images
    for s in range(0, m, block_size):
        image_rank[s:s + block_size] = _rank_of(txt[s:s + block_size] @ img.T, t2i[s:s + block_size])

    text_rank = np.empty(n, dtype=np.int64)  # per image: rank of its best-ranked text
    for s in range(0, n, block_size):
        scores = img[s:s + block_size] @ txt.T  # (B, M)
        own = t2i[None, :] == np.arange(s, s + scores.shape[0])[:, None]
        # The first positive in rank order (highest score, then lowest index) decides the hit.
        best = np.argmax(np.where(own, scores, -np.inf), axis=1)
        text_rank[s:s + block_size] = _rank_of(scores, best)

    # An image's best own text ranks at worst behind the M - c texts of other images.
    worst_text_rank = m - int(per_image.min())
    out: dict[str, float] = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = float(np.mean(image_rank < k)) if k < n else float("nan")
        out[f"text_retrieval_recall@{k}"] = (float(np.mean(text_rank < k)) if k <= worst_text_rank
                                             else float("nan"))
    return out


# --- linear probe -----------------------------------------------------------------------------


def _probe_scores(clf, feats: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, C_fit) class probabilities and the labels as their columns: the candidates are the
    classes the probe was fit on, so top-k is n/a from k = C_fit on (labels are a subset, checked)."""
    return clf.predict_proba(feats), np.searchsorted(clf.classes_, labels)


def linear_probe(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    val_feats: np.ndarray,
    val_labels: np.ndarray,
    test_feats: np.ndarray,
    test_labels: np.ndarray,
    *,
    regs: Sequence[float] = DEFAULT_REGS,
    seed: int = 0,
    normalize: bool = True,
    max_iter: int = 1000,
) -> dict:
    """Logistic regression on frozen features (CLIP's linear probe protocol).

    For each L2 strength λ in `regs` fit scikit-learn's L-BFGS `LogisticRegression(C=1/λ)` on
    train and score top-1 on val; the best λ (ties: the larger λ, the simpler model) is refit on
    train+val and scored on test with CLIP_benchmark's acc1/acc5/mean_per_class_recall (acc5 is
    NaN with 5 train classes or fewer: the top 5 of those hold every label).
    `normalize` L2-normalises features first, as CLIP_benchmark's `Featurizer` does.
    """
    from sklearn.linear_model import LogisticRegression  # heavy import, only for this metric

    splits = {}
    for name, x, y in (("train", train_feats, train_labels), ("val", val_feats, val_labels),
                       ("test", test_feats, test_labels)):
        x = _matrix(x, f"{name}_feats")
        splits[name] = (_l2_normalize(x, f"{name}_feats") if normalize else x,
                        _labels(y, f"{name}_labels", x.shape[0]))
    widths = {x.shape[1] for x, _ in splits.values()}
    if len(widths) != 1:
        raise DataError(f"train/val/test features have different widths {sorted(widths)}")
    seen = set(np.unique(splits["train"][1]).tolist())
    check_num_classes(len(seen), "train_labels", "a linear probe")
    for name in ("val", "test"):
        missing = sorted(set(np.unique(splits[name][1]).tolist()) - seen)
        if missing:
            raise DataError(f"{name}_labels contain classes {missing[:10]} that train_labels lack")
    if not regs or any(r <= 0 for r in regs):
        raise DataError(f"regs must be positive L2 strengths, got {tuple(regs)}")

    def fit(x: np.ndarray, y: np.ndarray, reg: float):
        return LogisticRegression(C=1.0 / reg, max_iter=max_iter, random_state=seed).fit(x, y)

    (xtr, ytr), (xva, yva), (xte, yte) = splits["train"], splits["val"], splits["test"]
    val_acc1 = {}
    for reg in sorted(float(r) for r in regs):
        val_acc1[reg] = accuracy_topk(*_probe_scores(fit(xtr, ytr, reg), xva, yva), ks=(1,))["acc1"]
    best = max(val_acc1, key=lambda r: (val_acc1[r], r))

    final = fit(np.concatenate([xtr, xva]), np.concatenate([ytr, yva]), best)
    result = classification_metrics(*_probe_scores(final, xte, yte), ks=(1, 5))
    # String keys so the sweep survives a JSON round trip unchanged.
    result.update(reg=best, val_acc1_by_reg={f"{r:g}": a for r, a in val_acc1.items()},
                  seed=seed, normalized=normalize)
    return result
