"""The MLX engine's CPU reformulations (`mlx_backend/cpu_math.py`), each against float64 numpy:
values, gradients (from their custom VJPs) and the edge cases the trainer relies on (NaN passes
through, subnormals never appear).

Tolerances: float32 rounding of results of magnitude ~1 is 6e-8; the polynomials are specified at
~1e-7 relative; gradients compose a few such steps: 1e-6 absolute on values and gradients of order 1.
"""

import mlx_clip  # noqa: F401  (BLAS loader first)

import mlx.core as mx
import numpy as np
import pytest

from mlx_clip.mlx_backend import cpu_math

ABS = 1e-6


def grid(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([np.linspace(-60, 60, 4001), rng.normal(0, 3, 20000)]).astype(np.float32)


def test_quick_gelu_and_its_gradient_equal_float64():
    x = grid()
    x64 = x.astype(np.float64)
    sig = 1 / (1 + np.exp(-1.702 * x64))
    cotangent = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    (out,), (grad,) = mx.vjp(cpu_math.quick_gelu, [mx.array(x)], [mx.array(cotangent)])
    assert np.max(np.abs(np.array(out) - x64 * sig)) <= ABS
    expected = cotangent * (sig + 1.702 * x64 * sig * (1 - sig))
    assert np.max(np.abs(np.array(grad) - expected)) <= ABS
    assert np.isnan(np.array(cpu_math.quick_gelu(mx.array([np.nan, 1.0], dtype=mx.float32))))[0]


@pytest.mark.parametrize("masked", [False, True])
def test_softmax_and_its_gradient_equal_float64(masked):
    rng = np.random.default_rng(2)
    scores = rng.normal(0, 4, (3, 2, 9, 9)).astype(np.float32)
    mask = np.where(np.tril(np.ones((9, 9), bool)), 0, -1e30).astype(np.float32) if masked else None
    cotangent = rng.normal(size=scores.shape).astype(np.float32)
    s64 = scores.astype(np.float64) + (mask if masked else 0)
    weights = np.exp(s64 - s64.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected_grad = weights * (cotangent - (cotangent * weights).sum(-1, keepdims=True))

    def f(s):
        return cpu_math.softmax(s, mx.array(mask) if masked else None)

    (out,), (grad,) = mx.vjp(f, [mx.array(scores)], [mx.array(cotangent)])
    np.testing.assert_allclose(np.array(out), weights, atol=1e-7, rtol=1e-6)
    np.testing.assert_allclose(np.array(grad), expected_grad, atol=ABS)
    if masked:  # exactly zero, never a subnormal that would slow every later multiply
        assert np.all(np.array(out)[..., ~np.tril(np.ones((9, 9), bool))] == 0)


def test_exp_flushes_underflow_to_zero_and_keeps_nan():
    values = np.array(cpu_math.exp(mx.array([-200.0, -88.0, -87.3, np.nan, 88.0], dtype=mx.float32)))
    assert values[0] == 0 and values[1] == 0
    assert values[2] >= np.finfo(np.float32).tiny  # the smallest values kept are normal floats
    assert np.isnan(values[3]) and np.isfinite(values[4])


def test_linear_gradients_equal_float64_and_the_weight_gradient_is_contiguous():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 5, 6)).astype(np.float32)
    w = rng.normal(size=(7, 6)).astype(np.float32)
    b = rng.normal(size=(7,)).astype(np.float32)
    cot = rng.normal(size=(4, 5, 7)).astype(np.float32)
    (out,), grads = mx.vjp(lambda x, w, b: cpu_math.linear(x, w, b), [mx.array(x), mx.array(w), mx.array(b)],
                           [mx.array(cot)])
    x64, w64, c64 = x.astype(np.float64), w.astype(np.float64), cot.astype(np.float64)
    np.testing.assert_allclose(np.array(out), x64 @ w64.T + b, atol=ABS)
    dx, dw, db = (np.array(g) for g in grads)
    np.testing.assert_allclose(dx, c64 @ w64, atol=ABS)
    np.testing.assert_allclose(dw, c64.reshape(-1, 7).T @ x64.reshape(-1, 6), atol=ABS)
    np.testing.assert_allclose(db, c64.sum(axis=(0, 1)), atol=ABS)
    assert np.array(grads[1], copy=False).strides == (6 * 4, 4)  # row-major (out, in)
    (_,), (dx2, dw2) = mx.vjp(lambda x, w: cpu_math.linear(x, w), [mx.array(x), mx.array(w)], [mx.array(cot)])
    assert np.array_equal(np.array(dw2), dw) and np.array_equal(np.array(dx2), dx)


def test_backward_of_each_stream_runs_on_that_stream():
    """The custom VJPs are pinned to the forward's stream: a slice's gradient equals the one the
    same slice gets alone on the default stream (the engine's batch split depends on it)."""
    from mlx_clip.mlx_backend.parallel import BatchSplit

    rng = np.random.default_rng(4)
    x = mx.array(rng.normal(size=(6, 8)).astype(np.float32))
    w = mx.array(rng.normal(size=(5, 8)).astype(np.float32))
    split = BatchSplit(count=2)

    def loss(w, batch_split):
        return batch_split(lambda part: cpu_math.quick_gelu(cpu_math.linear(part, w)), x).sum()

    split_grad = mx.grad(lambda w: loss(w, split))(w)
    plain_grad = mx.grad(lambda w: loss(w, BatchSplit(count=1)))(w)
    np.testing.assert_allclose(np.array(split_grad), np.array(plain_grad), atol=ABS)
