"""NegCLIP-style hard-negative captions in the contrastive losses of both engines.

References: float64 numpy losses written here from the definitions (Yuksekgonul et al. 2023,
"When and why vision-language models behave like bags-of-words", ICLR, with each image's
negatives as extra candidates of its own image->text row only), and NegCLIP's formulation
(negatives appended to the batch's captions) for a batch of one, where the two coincide.
Tolerances are about 10x the error measured (stated beside each): float32 loss values against
the float64 references (relative), and MLX gradients against torch's (absolute, per entry).
"""

import mlx_clip  # noqa: F401  (loads the optimized BLAS before mlx)

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_clip.mlx_backend import loss as mlx_loss
from mlx_clip.torch_backend import loss as torch_loss

DIM = 16
CLIP_SCALE = np.float32(1 / 0.07)
SIGLIP_SCALE, SIGLIP_BIAS = np.float32(10.0), np.float32(-10.0)
SIZES = ((5, 2), (7, 3))  # (B, K)

# Relative error of a loss, float32 engines against the float64 references; measured at most
# 4.7e-7 (clip) and 1.5e-7 (siglip) over the cases below.
VALUE_TOL = 5e-6
# Max |MLX gradient - torch gradient| over every entry (entries up to about 1): measured 4.8e-7.
GRAD_TOL = 5e-6
# An all-False mask against negatives=None, max |difference|: measured 4.8e-7 for the values and
# 1.2e-7 for the gradients (the image rows' reductions also run over the masked slots).
EMPTY_MASK_TOL = 5e-6


# ---------------------------------------------------------------- inputs


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal((*shape, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _inputs(batch: int, slots: int, seed: int) -> dict:
    """Embeddings and a mask with row 0 all padding, row 1 all real, the rest random."""
    rng = np.random.default_rng(seed)
    mask = rng.random((batch, slots)) < 0.5
    mask[0], mask[1] = False, True
    text = _unit(rng, batch)
    # Images near their captions, and hard negatives near them too, so that the negatives
    # weigh in the loss and its gradient (as after pre-training).
    image = _near(text, _unit(rng, batch), 0.7)
    negatives = _near(text[:, None, :], _unit(rng, batch, slots), 0.5)
    return {"image": image, "text": text, "negatives": negatives, "mask": mask}


def _near(anchor: np.ndarray, noise: np.ndarray, scale: float) -> np.ndarray:
    x = anchor + scale * noise
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _repeated_labels(batch: int) -> np.ndarray:
    return np.random.default_rng(batch).permutation(np.arange(batch) % ((batch + 1) // 2))


# ---------------------------------------------------------------- float64 numpy definitions


def _np_row_cross_entropy(logits, positive, candidate, eps, beta):
    """Mean over rows of -sum_j q_ij log p_ij over each row's candidates (all (R, C) arrays).

    q: uniform over the row's positives, smoothed as (1 - eps) q + eps / n_i over its n_i
    candidates; p_ij = w_ij e^s_ij / sum_{candidates k} w_ik e^s_ik, with the Robinson et al.
    weights w = e^(beta s) / mean over the row's non-positive candidates on those, 1 elsewhere.
    """
    negative = candidate & ~positive
    q = positive / positive.sum(1, keepdims=True)
    q = (1 - eps) * q + eps * candidate / candidate.sum(1, keepdims=True)
    w = np.ones_like(logits)
    if beta:
        hard = np.exp(beta * logits)
        count = np.maximum(negative.sum(1, keepdims=True), 1)
        mean = (hard * negative).sum(1, keepdims=True) / count
        w = np.where(negative, hard / mean, 1.0)
    unnormalised = np.where(candidate, w * np.exp(logits), 0.0)
    log_p = np.log(np.where(candidate, unnormalised / unnormalised.sum(1, keepdims=True), 1.0))
    return -(q * log_p).sum(1).mean()


def _np_logits(case, scale, bias):
    image, text, negatives = (
        np.asarray(case[k], np.float64) for k in ("image", "text", "negatives")
    )
    offset = 0.0 if bias is None else float(bias)
    s = float(scale) * image @ text.T + offset  # (B, B)
    e = float(scale) * np.einsum("bd,bkd->bk", image, negatives) + offset  # (B, K)
    return s, e


def _np_clip(case, scale, bias=None, labels=None, eps=0.0, beta=0.0):
    s, e = _np_logits(case, scale, bias)
    batch = s.shape[0]
    labels = np.arange(batch) if labels is None else labels
    positive = labels[:, None] == labels[None, :]
    mask = case["mask"]
    per_image = _np_row_cross_entropy(
        np.concatenate([s, e], 1),
        np.concatenate([positive, np.zeros_like(mask)], 1),
        np.concatenate([np.ones_like(positive), mask], 1),
        eps,
        beta,
    )
    per_text = _np_row_cross_entropy(s.T, positive, np.ones_like(positive), eps, beta)
    return (per_image + per_text) / 2


def _np_siglip(case, scale, bias, labels=None):
    s, e = _np_logits(case, scale, bias)
    batch = s.shape[0]
    labels = np.arange(batch) if labels is None else labels
    signs = np.where(labels[:, None] == labels[None, :], 1.0, -1.0)
    log_sigmoid = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731
    return -(log_sigmoid(signs * s).sum() + log_sigmoid(-e)[case["mask"]].sum()) / batch


# ---------------------------------------------------------------- engine runners


def _run_mlx(name, case, scale, bias=None, labels=None, **options):
    """Loss and gradients w.r.t. image, text and negatives."""
    fn = mlx_loss.LOSSES[name]
    extra = {"labels": None if labels is None else mx.array(labels), **options}
    mask = mx.array(case["mask"])
    bias = None if bias is None else mx.array(bias)

    def loss(image, text, negatives):
        return fn(
            image, text, mx.array(scale), bias, negatives=negatives, negative_mask=mask, **extra
        )

    arrays = [mx.array(case[k]) for k in ("image", "text", "negatives")]
    value, grads = mx.value_and_grad(loss, argnums=(0, 1, 2))(*arrays)
    return float(value), [np.array(g) for g in grads]


def _run_torch(name, case, scale, bias=None, labels=None, **options):
    fn = torch_loss.LOSSES[name]
    extra = {"labels": None if labels is None else torch.as_tensor(labels), **options}
    tensors = [torch.tensor(case[k], requires_grad=True) for k in ("image", "text", "negatives")]
    value = fn(
        *tensors[:2],
        torch.tensor(scale),
        None if bias is None else torch.tensor(bias),
        negatives=tensors[2],
        negative_mask=torch.as_tensor(case["mask"]),
        **extra,
    )
    value.backward()
    return value.item(), [t.grad.numpy() for t in tensors]


ENGINES = {"mlx": _run_mlx, "torch": _run_torch}

CLIP_OPTIONS = [
    {},
    {"labels": True},
    {"label_smoothing": 0.1},
    {"hard_negative_beta": 0.5},
    {"labels": True, "label_smoothing": 0.1, "hard_negative_beta": 0.5},
    {"bias": np.float32(-2.5), "labels": True, "label_smoothing": 0.1, "hard_negative_beta": 0.5},
]


def _clip_call(options: dict, batch: int) -> dict:
    """Engine keyword arguments for one of CLIP_OPTIONS."""
    call = dict(options)
    call["labels"] = _repeated_labels(batch) if call.pop("labels", False) else None
    return call


def _relative_error(actual: float, reference: float) -> float:
    return abs(actual - reference) / abs(reference)


# ---------------------------------------------------------------- against the definitions


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("batch,slots", SIZES)
@pytest.mark.parametrize("options", CLIP_OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_clip_matches_definition(engine, batch, slots, options):
    case = _inputs(batch, slots, seed=batch)
    call = _clip_call(options, batch)
    value, _ = ENGINES[engine]("clip", case, CLIP_SCALE, **call)
    reference = _np_clip(
        case,
        CLIP_SCALE,
        call.get("bias"),
        call["labels"],
        call.get("label_smoothing", 0.0),
        call.get("hard_negative_beta", 0.0),
    )
    assert _relative_error(value, reference) <= VALUE_TOL, (value, reference)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("batch,slots", SIZES)
@pytest.mark.parametrize("with_labels", (False, True))
@pytest.mark.parametrize("bias", (SIGLIP_BIAS, None))
def test_siglip_matches_definition(engine, batch, slots, with_labels, bias):
    case = _inputs(batch, slots, seed=100 + batch)
    labels = _repeated_labels(batch) if with_labels else None
    value, _ = ENGINES[engine]("siglip", case, SIGLIP_SCALE, bias, labels)
    reference = _np_siglip(case, SIGLIP_SCALE, bias, labels)
    assert _relative_error(value, reference) <= VALUE_TOL, (value, reference)


@pytest.mark.parametrize("engine", ENGINES)
def test_negatives_raise_the_clip_loss(engine):
    # Sanity of the references above: hard negatives make the task harder, not a no-op.
    case = _inputs(5, 3, seed=5)
    with_negatives, _ = ENGINES[engine]("clip", case, CLIP_SCALE)
    without = _np_clip({**case, "mask": np.zeros_like(case["mask"])}, CLIP_SCALE)
    assert with_negatives > without + 1e-2


def test_negclip_concatenation_agrees_for_a_batch_of_one():
    """NegCLIP's formulation appends every row's negative to the captions, so every image sees
    every negative; with one image, "own" and "all" are the same and the losses must agree.

    Reference: image->text cross-entropy over the columns [captions, appended negatives] with
    the diagonal as target, text->image over the real captions only, averaged.
    """
    case = _inputs(2, 1, seed=7)
    case = {k: v[:1] for k, v in case.items()}
    case["mask"] = np.ones((1, 1), bool)
    image, text, negatives = (case[k].astype(np.float64) for k in ("image", "text", "negatives"))
    columns = np.concatenate([text, negatives[:, 0]], 0)  # (2B, D): captions, then negatives
    logits = CLIP_SCALE * image @ columns.T  # (B, 2B)
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    per_image = -log_p[0, 0]
    per_text = 0.0  # one caption, one image: the text->image softmax has a single entry
    reference = (per_image + per_text) / 2
    for run in ENGINES.values():
        value, _ = run("clip", case, CLIP_SCALE)
        assert _relative_error(value, reference) <= VALUE_TOL, (value, reference)


# ---------------------------------------------------------------- MLX == torch, gradients


@pytest.mark.parametrize("batch,slots", SIZES)
@pytest.mark.parametrize(
    "name,options",
    [("clip", options) for options in CLIP_OPTIONS]
    + [("siglip", {"bias": SIGLIP_BIAS}), ("siglip", {"bias": SIGLIP_BIAS, "labels": True})],
)
def test_mlx_gradients_equal_torch(name, options, batch, slots):
    case = _inputs(batch, slots, seed=batch)
    call = _clip_call(options, batch)
    scale = CLIP_SCALE if name == "clip" else SIGLIP_SCALE
    mlx_value, mlx_grads = _run_mlx(name, case, scale, **call)
    torch_value, torch_grads = _run_torch(name, case, scale, **call)
    assert _relative_error(mlx_value, torch_value) <= VALUE_TOL
    for mlx_grad, torch_grad in zip(mlx_grads, torch_grads):
        np.testing.assert_allclose(mlx_grad, torch_grad, rtol=0, atol=GRAD_TOL)
    assert np.abs(mlx_grads[2]).max() > 1e-3  # the negatives do receive a gradient


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", ("clip", "siglip"))
def test_masked_slots_get_zero_gradient_whatever_their_padding(engine, name):
    case = _inputs(6, 3, seed=6)
    options = {"labels": _repeated_labels(6), "bias": np.float32(-1.0)}
    if name == "clip":
        options.update(label_smoothing=0.1, hard_negative_beta=0.5)
    zero_padded = ENGINES[engine](name, case, CLIP_SCALE, **options)
    nan_padded_negatives = np.where(case["mask"][..., None], case["negatives"], np.nan)
    nan_case = {**case, "negatives": nan_padded_negatives.astype(np.float32)}
    nan_padded = ENGINES[engine](name, nan_case, CLIP_SCALE, **options)
    for value, grads in (zero_padded, nan_padded):
        assert np.isfinite(value)
        assert all(np.isfinite(g).all() for g in grads)
        assert np.all(grads[2][~case["mask"]] == 0.0)  # exactly zero, row 0 has no valid slot
    assert nan_padded[0] == zero_padded[0]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    "name,options",
    [("clip", CLIP_OPTIONS[-1]), ("clip", {}), ("siglip", {"bias": SIGLIP_BIAS, "labels": True})],
)
def test_all_false_mask_equals_no_negatives(engine, name, options):
    case = _inputs(5, 2, seed=11)
    case["mask"] = np.zeros_like(case["mask"])
    call = _clip_call(options, 5)
    scale = CLIP_SCALE if name == "clip" else SIGLIP_SCALE
    value, grads = ENGINES[engine](name, case, scale, **call)
    plain_value, plain_grads = _run_without_negatives(engine, name, case, scale, **call)
    assert abs(value - plain_value) <= EMPTY_MASK_TOL
    for grad, plain_grad in zip(grads, plain_grads):
        np.testing.assert_allclose(grad, plain_grad, rtol=0, atol=EMPTY_MASK_TOL)
    assert np.all(grads[2] == 0.0)


def _run_without_negatives(engine, name, case, scale, bias=None, labels=None, **options):
    """Loss and gradients w.r.t. image and text with negatives=None: today's code path."""
    if engine == "mlx":
        fn, as_array = mlx_loss.LOSSES[name], mx.array
    else:
        fn, as_array = torch_loss.LOSSES[name], torch.as_tensor
    scale, bias = as_array(scale), None if bias is None else as_array(bias)
    labels = None if labels is None else as_array(labels)

    def loss(image, text):
        return fn(image, text, scale, bias, labels=labels, **options)

    if engine == "mlx":
        value, grads = mx.value_and_grad(loss, argnums=(0, 1))(
            mx.array(case["image"]), mx.array(case["text"])
        )
        return float(value), [np.array(g) for g in grads]
    tensors = [torch.tensor(case[k], requires_grad=True) for k in ("image", "text")]
    value = loss(*tensors)
    value.backward()
    return value.item(), [t.grad.numpy() for t in tensors]


# ---------------------------------------------------------------- MLX tracing, errors


@pytest.mark.parametrize("name", ("clip", "siglip"))
def test_mlx_losses_with_negatives_trace_under_compile(name):
    case = _inputs(6, 3, seed=3)
    arrays = [mx.array(case[k]) for k in ("image", "text", "negatives", "mask")]
    labels = mx.array(_repeated_labels(6))
    options = {"label_smoothing": 0.1, "hard_negative_beta": 0.5} if name == "clip" else {}

    def loss(image, text, negatives, mask, labels):
        return mlx_loss.LOSSES[name](
            image,
            text,
            mx.array(CLIP_SCALE),
            mx.array(-1.0),
            labels=labels,
            negatives=negatives,
            negative_mask=mask,
            **options,
        )

    value_and_grad = mx.value_and_grad(loss, argnums=(0, 1, 2))
    eager = value_and_grad(*arrays, labels)
    compiled = mx.compile(value_and_grad)(*arrays, labels)
    np.testing.assert_allclose(np.array(compiled[0]), np.array(eager[0]), rtol=1e-6)
    for grad, eager_grad in zip(compiled[1], eager[1]):
        np.testing.assert_allclose(np.array(grad), np.array(eager_grad), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", ("clip", "siglip"))
def test_bad_negatives_raise_errors_naming_the_shapes(engine, name):
    case = _inputs(5, 2, seed=5)
    as_array = mx.array if engine == "mlx" else torch.tensor
    image, text, negatives, mask = (
        as_array(case[k]) for k in ("image", "text", "negatives", "mask")
    )
    module = mlx_loss if engine == "mlx" else torch_loss

    def loss(**negative_options):
        return module.LOSSES[name](
            image, text, as_array(CLIP_SCALE), as_array(SIGLIP_BIAS), **negative_options
        )

    with pytest.raises(ValueError, match=r"got negatives \(5, 2, 16\) and negative_mask None"):
        loss(negatives=negatives)
    with pytest.raises(ValueError, match=r"got negatives None and negative_mask \(5, 2\)"):
        loss(negative_mask=mask)
    wide_mask = as_array(np.ones((5, 3), bool))
    with pytest.raises(ValueError, match=r"= \(5, K, 16\).*got \(5, 2, 16\) and \(5, 3\)"):
        loss(negatives=negatives, negative_mask=wide_mask)
    with pytest.raises(ValueError, match=r"\(4, 2, 16\) and \(4, 2\) for image_embeds \(5, 16\)"):
        loss(negatives=negatives[:4], negative_mask=mask[:4])
