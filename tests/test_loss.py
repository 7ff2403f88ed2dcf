"""Contrastive losses of both engines against open_clip, torch's cross-entropy and the papers.

References: open_clip's `ClipLoss` / `SigLipLoss` (values, and gradients by torch autograd
through them), `torch.nn.functional.cross_entropy(label_smoothing=...)`, and float64 numpy
implementations written from the definitions (soft-target cross-entropy; Robinson et al. 2021
hard-negative weights) with gradients by central differences. Tolerance: fp32, 1e-5 relative
(norm of the difference over the norm of the reference) for values and gradients.
"""

import inspect

import mlx_clip  # noqa: F401  (loads the optimized BLAS before mlx)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from mlx_clip.mlx_backend import loss as mlx_loss
from mlx_clip.errors import ConfigError
from mlx_clip.torch_backend import loss as torch_loss

BATCHES = (1, 5, 16)
DIM = 32
CLIP_SCALE = np.float32(1 / 0.07)  # CLIP's initial exp(logit_scale)
SIGLIP_SCALE, SIGLIP_BIAS = np.float32(10.0), np.float32(-10.0)  # SigLIP's initial values
TOL = 1e-5


# ---------------------------------------------------------------- inputs and engine runners


def _embeds(batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pair = rng.standard_normal((2, batch, DIM)).astype(np.float32)
    pair /= np.linalg.norm(pair, axis=-1, keepdims=True)
    return pair[0], pair[1]


def _clip_inputs(batch: int) -> list[np.ndarray]:
    image, text = _embeds(batch, seed=batch)
    return [image, text, np.array(CLIP_SCALE)]


def _siglip_inputs(batch: int) -> list[np.ndarray]:
    image, text = _embeds(batch, seed=100 + batch)
    return [image, text, np.array(SIGLIP_SCALE), np.array(SIGLIP_BIAS)]


def _duplicated_labels(batch: int) -> np.ndarray:
    # About two rows per class: every batch of 5+ has same-class pairs off the diagonal and
    # negatives too.
    classes = np.arange(batch) % max((batch + 1) // 2, 1)
    return np.random.default_rng(batch).permutation(classes)


def _run_mlx(fn, inputs, labels=None, **options):
    """Loss value and gradients w.r.t. every input, via mx.value_and_grad."""
    if labels is not None:
        options["labels"] = mx.array(labels)
    value, grads = mx.value_and_grad(
        lambda *xs: fn(*xs, **options), argnums=tuple(range(len(inputs)))
    )(*[mx.array(x) for x in inputs])
    return np.array(value), [np.array(g) for g in grads]


def _run_torch(fn, inputs, labels=None, **options):
    """Loss value and gradients w.r.t. every input, via torch autograd."""
    if labels is not None:
        options["labels"] = torch.as_tensor(labels)
    tensors = [torch.tensor(x, requires_grad=True) for x in inputs]
    value = fn(*tensors, **options)
    value.backward()
    return value.detach().numpy(), [t.grad.numpy() for t in tensors]


ENGINES = {
    "mlx": (_run_mlx, mlx_loss),
    "torch": (_run_torch, torch_loss),
}


def _assert_close(actual, reference, tol: float = TOL) -> None:
    """Norm of the difference <= tol * norm of the reference (+ a floor for zero references)."""
    actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    err = np.linalg.norm(actual - reference)
    assert err <= tol * np.linalg.norm(reference) + 1e-7, (err, np.linalg.norm(reference))


def _assert_run_close(run, reference, tol: float = TOL) -> None:
    _assert_close(run[0], reference[0], tol)
    assert len(run[1]) == len(reference[1])
    for grad, ref_grad in zip(run[1], reference[1]):
        _assert_close(grad, ref_grad, tol)


# ---------------------------------------------------------------- float64 numpy definitions


def _np_clip_loss(image, text, scale, labels=None, label_smoothing=0.0, beta=0.0):
    """Symmetric soft-target cross-entropy, written from the definitions in float64.

    Row i: targets q_i uniform over its positives (same label, or the diagonal), smoothed as
    (1 - eps) q + eps / B; model distribution p_ij = w_ij e^s_ij / sum_k w_ik e^s_ik with the
    Robinson et al. 2021 weights w_ik = e^(beta s_ik) / mean_{negatives k'} e^(beta s_ik') on
    negatives and 1 on positives; loss_i = -sum_j q_ij log p_ij. Vectorised over any leading
    axes of the inputs (image, text (..., B, D); scale (...)), so finite differences run at once.
    """
    logits = np.asarray(scale)[..., None, None] * image @ np.swapaxes(text, -1, -2)
    batch = logits.shape[-1]
    labels = np.arange(batch) if labels is None else np.asarray(labels)
    positive = labels[:, None] == labels[None, :]
    negative = ~positive
    targets = positive / positive.sum(-1, keepdims=True)
    targets = (1 - label_smoothing) * targets + label_smoothing / batch

    def one_side(s):
        hard = np.exp(beta * s)
        mean_hard = (hard * negative).sum(-1, keepdims=True) / np.maximum(
            negative.sum(-1, keepdims=True), 1
        )
        with np.errstate(divide="ignore", invalid="ignore"):  # rows with no negative
            w = np.where(negative, hard / mean_hard, 1.0)
        p = w * np.exp(s) / (w * np.exp(s)).sum(-1, keepdims=True)
        return -(targets * np.log(p)).sum(-1).mean(-1)

    return (one_side(logits) + one_side(np.swapaxes(logits, -1, -2))) / 2


def _np_value_and_grads(fn, inputs, h: float = 1e-6):
    """fn's value in float64 and its gradients w.r.t. every input by central differences."""
    inputs = [np.asarray(x, np.float64) for x in inputs]
    grads = []
    for k, x in enumerate(inputs):
        n = x.size
        # Row r of the stack moves entry r // 2 of input k by +h (r even) or -h (r odd).
        steps = np.zeros((2 * n, n))
        steps[0::2][np.arange(n), np.arange(n)] = h
        steps[1::2][np.arange(n), np.arange(n)] = -h
        stacked = [np.broadcast_to(y, (2 * n, *y.shape)) for y in inputs]
        stacked[k] = x[None] + steps.reshape(2 * n, *x.shape)
        values = fn(*stacked)
        grads.append(((values[0::2] - values[1::2]) / (2 * h)).reshape(x.shape))
    return fn(*inputs), grads


# ---------------------------------------------------------------- open_clip parity


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("batch", BATCHES)
def test_clip_loss_matches_open_clip(engine, batch):
    run, module = ENGINES[engine]
    inputs = _clip_inputs(batch)
    reference = _run_torch(lambda i, t, s: ClipLoss()(i, t, s), inputs)
    _assert_run_close(run(module.clip_loss, inputs), reference)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("batch", BATCHES)
def test_siglip_loss_matches_open_clip(engine, batch):
    run, module = ENGINES[engine]
    inputs = _siglip_inputs(batch)
    reference = _run_torch(lambda i, t, s, b: SigLipLoss()(i, t, s, b), inputs)
    _assert_run_close(run(module.siglip_loss, inputs), reference)


@pytest.mark.parametrize("engine", ENGINES)
def test_clip_loss_with_bias_matches_open_clip(engine):
    run, module = ENGINES[engine]
    inputs = _clip_inputs(5)
    bias = np.float32(-2.5)
    reference = _run_torch(lambda i, t, s: ClipLoss()(i, t, s, torch.tensor(bias)), inputs)
    _assert_run_close(run(lambda i, t, s: module.clip_loss(i, t, s, bias), inputs), reference)


# ---------------------------------------------------------------- options against references


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("batch", BATCHES)
def test_label_smoothing_matches_torch_cross_entropy(engine, batch):
    run, module = ENGINES[engine]
    inputs, eps = _clip_inputs(batch), 0.1

    def reference_loss(image, text, scale):
        logits = scale * image @ text.T
        targets = torch.arange(logits.shape[0])
        return (
            F.cross_entropy(logits, targets, label_smoothing=eps)
            + F.cross_entropy(logits.T, targets, label_smoothing=eps)
        ) / 2

    reference = _run_torch(reference_loss, inputs)
    _assert_run_close(run(module.clip_loss, inputs, label_smoothing=eps), reference)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("label_smoothing", (0.0, 0.1))
def test_distinct_labels_equal_plain_loss_exactly(engine, label_smoothing):
    run, module = ENGINES[engine]
    inputs = _clip_inputs(16)
    labels = np.random.default_rng(0).permutation(16) * 7
    plain = run(module.clip_loss, inputs, label_smoothing=label_smoothing)
    labelled = run(module.clip_loss, inputs, labels=labels, label_smoothing=label_smoothing)
    np.testing.assert_array_equal(labelled[0], plain[0])
    for grad, plain_grad in zip(labelled[1], plain[1]):
        np.testing.assert_array_equal(grad, plain_grad)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("label_smoothing", (0.0, 0.1))
def test_multi_positive_matches_soft_target_definition(engine, batch, label_smoothing):
    run, module = ENGINES[engine]
    inputs, labels = _clip_inputs(batch), _duplicated_labels(batch)
    reference = _np_value_and_grads(
        lambda i, t, s: _np_clip_loss(i, t, s, labels, label_smoothing), inputs
    )
    result = run(module.clip_loss, inputs, labels=labels, label_smoothing=label_smoothing)
    _assert_run_close(result, reference)


@pytest.mark.parametrize("engine", ENGINES)
def test_hard_negative_beta_zero_is_plain_loss(engine):
    run, module = ENGINES[engine]
    inputs = _clip_inputs(16)
    plain = run(module.clip_loss, inputs)
    zero = run(module.clip_loss, inputs, hard_negative_beta=0.0)
    np.testing.assert_array_equal(zero[0], plain[0])
    for grad, plain_grad in zip(zero[1], plain[1]):
        np.testing.assert_array_equal(grad, plain_grad)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("with_labels", (False, True))
def test_hard_negatives_match_robinson_definition(engine, batch, with_labels):
    run, module = ENGINES[engine]
    inputs, beta = _clip_inputs(batch), 0.5
    labels = _duplicated_labels(batch) if with_labels else None
    reference = _np_value_and_grads(
        lambda i, t, s: _np_clip_loss(i, t, s, labels, beta=beta), inputs
    )
    result = run(module.clip_loss, inputs, labels=labels, hard_negative_beta=beta)
    _assert_run_close(result, reference)
    if batch > 1:  # with one pair there is no negative to reweight
        plain = _np_clip_loss(*inputs, labels=labels)
        assert abs(float(result[0]) - float(plain)) > 1e-2


@pytest.mark.parametrize("engine", ENGINES)
def test_siglip_labels_make_same_class_pairs_positive(engine):
    run, module = ENGINES[engine]
    inputs, labels = _siglip_inputs(16), _duplicated_labels(16)

    def reference_loss(image, text, scale, bias):  # open_clip's formula, signs from the labels
        logits = scale * image @ text.T + bias
        signs = 2.0 * torch.as_tensor(labels[:, None] == labels[None, :]).float() - 1.0
        return -F.logsigmoid(signs * logits).sum() / logits.shape[0]

    reference = _run_torch(reference_loss, inputs)
    _assert_run_close(run(module.siglip_loss, inputs, labels=labels), reference)


# ---------------------------------------------------------------- MLX == torch, every option

OPTIONS = [
    ("clip", {}),
    ("clip", {"label_smoothing": 0.1}),
    ("clip", {"labels": True}),
    ("clip", {"hard_negative_beta": 1.0}),
    ("clip", {"labels": True, "label_smoothing": 0.2, "hard_negative_beta": 0.5}),
    ("siglip", {}),
    ("siglip", {"labels": True}),
]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name,options", OPTIONS)
def test_mlx_equals_torch(name, options, batch):
    options = dict(options)
    if options.pop("labels", False):
        options["labels"] = _duplicated_labels(batch)
    inputs = _clip_inputs(batch) if name == "clip" else _siglip_inputs(batch)
    mlx_run = _run_mlx(mlx_loss.LOSSES[name], inputs, **options)
    torch_run = _run_torch(torch_loss.LOSSES[name], inputs, **options)
    _assert_run_close(mlx_run, torch_run)


def test_registries_share_keys_and_signatures():
    assert mlx_loss.LOSSES.keys() == torch_loss.LOSSES.keys() == {"clip", "siglip"}
    for name, fn in mlx_loss.LOSSES.items():
        mlx_params = inspect.signature(fn).parameters
        torch_params = inspect.signature(torch_loss.LOSSES[name]).parameters
        assert [(p.name, p.kind, p.default) for p in mlx_params.values()] == [
            (p.name, p.kind, p.default) for p in torch_params.values()
        ]


# ---------------------------------------------------------------- MLX tracing, dtypes, errors


@pytest.mark.parametrize("name", ("clip", "siglip"))
def test_mlx_losses_trace_under_compile(name):
    inputs = [mx.array(x) for x in _siglip_inputs(16)]
    labels = mx.array(_duplicated_labels(16))
    options = {"label_smoothing": 0.1, "hard_negative_beta": 0.5} if name == "clip" else {}

    def loss(image, text, scale, bias, labels):
        return mlx_loss.LOSSES[name](image, text, scale, bias, labels=labels, **options)

    value_and_grad = mx.value_and_grad(loss, argnums=(0, 1, 2, 3))
    eager = value_and_grad(*inputs, labels)
    compiled = mx.compile(value_and_grad)(*inputs, labels)
    _assert_close(np.array(compiled[0]), np.array(eager[0]), 1e-6)
    for grad, eager_grad in zip(compiled[1], eager[1]):
        _assert_close(np.array(grad), np.array(eager_grad), 1e-6)


def test_mlx_clip_loss_under_nn_value_and_grad_and_compiled_step():
    class Towers(nn.Module):
        def __init__(self):
            super().__init__()
            self.image = nn.Linear(8, DIM)
            self.text = nn.Linear(8, DIM)
            self.logit_scale = mx.array(np.log(CLIP_SCALE))

        def __call__(self, x, y, labels):
            image = self.image(x)
            text = self.text(y)
            image = image / mx.linalg.norm(image, axis=-1, keepdims=True)
            text = text / mx.linalg.norm(text, axis=-1, keepdims=True)
            return mlx_loss.clip_loss(
                image, text, mx.exp(self.logit_scale), labels=labels, hard_negative_beta=0.5
            )

    mx.random.seed(0)
    model = Towers()
    rng = np.random.default_rng(0)
    x, y = (mx.array(rng.standard_normal((16, 8)).astype(np.float32)) for _ in range(2))
    labels = mx.array(_duplicated_labels(16))
    value_and_grad = nn.value_and_grad(model, lambda x, y, labels: model(x, y, labels))
    eager_value, eager_grads = value_and_grad(x, y, labels)
    step = mx.compile(value_and_grad, inputs=model.state, outputs=model.state)
    value, grads = step(x, y, labels)
    _assert_close(np.array(value), np.array(eager_value), 1e-6)
    for path in (("logit_scale",), ("image", "weight"), ("text", "bias")):
        grad, eager_grad = grads, eager_grads
        for key in path:
            grad, eager_grad = grad[key], eager_grad[key]
        _assert_close(np.array(grad), np.array(eager_grad), 1e-6)
    assert float(np.abs(np.array(grads["logit_scale"]))) > 0


@pytest.mark.parametrize("engine", ENGINES)
def test_bfloat16_embeddings_give_float32_loss(engine):
    _, module = ENGINES[engine]
    image, text, scale = _clip_inputs(16)
    if engine == "mlx":
        low = module.clip_loss(
            mx.array(image, mx.bfloat16), mx.array(text, mx.bfloat16), mx.array(scale)
        )
        assert low.dtype == mx.float32
    else:
        low = module.clip_loss(
            torch.tensor(image).bfloat16(), torch.tensor(text).bfloat16(), torch.tensor(scale)
        )
        assert low.dtype == torch.float32
    reference = ClipLoss()(torch.tensor(image), torch.tensor(text), torch.tensor(scale))
    _assert_close(float(low.item()), reference.item(), 3e-2)


@pytest.mark.parametrize("engine", ENGINES)
def test_bad_options_raise_one_line_errors(engine):
    _, module = ENGINES[engine]
    image, text, scale = _clip_inputs(5)
    as_array = mx.array if engine == "mlx" else torch.tensor
    image, text, scale = as_array(image), as_array(text), as_array(scale)
    with pytest.raises(ConfigError, match=r"label_smoothing must be in \[0, 1\), got 1.0"):
        module.clip_loss(image, text, scale, label_smoothing=1.0)
    with pytest.raises(ConfigError, match="hard_negative_beta must be >= 0, got -0.5"):
        module.clip_loss(image, text, scale, hard_negative_beta=-0.5)
    with pytest.raises(ValueError, match=r"labels must have shape \(5,\), got \(4,\)"):
        module.clip_loss(image, text, scale, labels=as_array(np.arange(4)))
    with pytest.raises(ValueError, match="must both be"):
        module.siglip_loss(image, text[:3], scale, None)
