"""Exact reformulations of the model's elementwise maths for MLX's CPU backend.

Why they exist (each measured on ViT-B/32 shapes by `python -m mlx_clip.benchmarks.ops`):

- MLX's CPU `exp` / `sigmoid` kernels are scalar: ~20 ns per element, against ~0.4 ns for the
  multiply-adds `mx.compile` fuses into one generated loop. Under `mx.compile`, `floor`,
  `maximum` and `minimum` are slow too (a libm call and NaN branches in the generated C++), so
  the exp below rounds with the float "magic number" trick and clamps with `where`.
- A fused kernel is cut every 11 ops of depth (`max_compile_depth` in MLX's compile.cpp), and
  every cut costs a pass over memory; the polynomials are evaluated in Estrin's scheme (depth 4
  instead of Horner's 7) to keep each function to few kernels.
- `nn.Linear`'s weight gradient comes out of autodiff as the transpose of a contiguous matmul
  result: a strided view that every optimizer kernel then reads column by column (15.5 ms against
  1.2 ms for one update of a 3072x768 weight). `linear` below computes the same gradient as one
  matmul that writes it contiguous.

On the GPU (Metal) MLX's native kernels are fast and these are not used.
"""

from __future__ import annotations

import mlx.core as mx

# Cephes' expf: exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 in two exact steps
# (Cody-Waite), exp(r) by a degree-7 polynomial on |r| <= ln2 / 2. Max relative error 8e-8.
_LN2_HI, _LN2_LO, _LOG2E = 0.693359375, -2.12194440e-4, 1.44269504088896341
_EXP_POLY = (1.0, 1.0, 5.0000001201e-1, 1.6666665459e-1, 4.1665795894e-2, 8.3334519073e-3,
             1.3981999507e-3, 1.9875691500e-4)  # c0 + c1 r + ... + c7 r^7
# Adding 1.5 * 2^23 rounds a float of magnitude < 2^22 to an integer, which then sits in the low
# mantissa bits of the sum: shifting those bits to the exponent field gives 2^n exactly.
_ROUNDING_MAGIC = 12582912.0
# exp is a normal float32 in between. Below, the result is flushed to exactly 0: a subnormal
# output (a masked attention weight, say) would slow every later multiply that reads it, the
# matmul with the values most of all (x86 handles subnormals in microcode, ~100x slower).
_EXP_MIN, _EXP_MAX = -87.33654, 88.72283


def _exp_polynomial(r: mx.array) -> mx.array:
    c = _EXP_POLY
    r2 = r * r
    r4 = r2 * r2
    low = (c[0] + c[1] * r) + r2 * (c[2] + c[3] * r)
    high = (c[4] + c[5] * r) + r2 * (c[6] + c[7] * r)
    return low + r4 * high


def _exp(x: mx.array) -> mx.array:
    underflow = x < _EXP_MIN
    clamped = mx.where(underflow, _EXP_MIN, x)  # `where` keeps NaN (the NaN guard relies on it)
    clamped = mx.where(clamped > _EXP_MAX, _EXP_MAX, clamped)
    shifted = clamped * _LOG2E + _ROUNDING_MAGIC
    n = shifted - _ROUNDING_MAGIC
    r = (clamped - n * _LN2_HI) - n * _LN2_LO
    two_to_n = (mx.left_shift(shifted.view(mx.int32), 23) + (127 << 23)).view(mx.float32)
    return mx.where(underflow, 0.0, _exp_polynomial(r) * two_to_n)


def on_current_stream(build):
    """A function with a custom VJP runs its backward on the stream current when the backward
    is built, not the one its forward ran on; the engine splits a batch over CPU streams, so each
    stream gets its own instance, whose backward is pinned to that stream."""
    instances = {}

    def instance():
        stream = mx.default_stream(mx.default_device())
        key = str(stream)  # "Stream(Device(cpu, 0), 1)": Stream has no public index
        if key not in instances:
            instances[key] = build(stream)
        return instances[key]

    return instance


@on_current_stream
def _exp_function(stream):
    @mx.custom_function
    def exp(x):
        return _exp(x.astype(mx.float32)).astype(x.dtype)

    @exp.vjp
    def exp_vjp(primals, cotangent, output):
        with mx.stream(stream):
            return (cotangent * output,)

    return exp


def exp(x: mx.array) -> mx.array:
    """exp(x) to float32 rounding (see `_EXP_POLY`); differentiable."""
    return _exp_function()(x)


def sigmoid(x: mx.array) -> mx.array:
    return 1.0 / (1.0 + exp(-x))


# quick_gelu(x) = x / (1 + 2^u), u = -1.702 x log2(e): the power of two is split as 2^n 2^r with
# n = round(u) (the magic-number trick) and r in [-1/2, 1/2], and 2^r is MLX's own degree-6 exp2
# polynomial (mlx/backend/cpu/simd/math.h). Working in base 2 rounds u once (6e-8 relative); the
# result's error stays below 1e-6 absolute, float32's own rounding of the activations.
_GELU_LOG2 = 1.702 * _LOG2E
_EXP2_POLY = (1.0, 6.931472028550421e-1, 2.402264791363012e-1, 5.550332471162809e-2, 9.618437357674640e-3,
              1.339887440266574e-3, 1.535336188319500e-4)


def _exp2_polynomial(r: mx.array) -> mx.array:
    c = _EXP2_POLY
    r2 = r * r
    r4 = r2 * r2
    return ((c[0] + c[1] * r) + r2 * (c[2] + c[3] * r)) + r4 * ((c[4] + c[5] * r) + r2 * c[6])


def _quick_gelu_with_exp(x: mx.array) -> tuple[mx.array, mx.array]:
    """(quick_gelu(x), 2^u) in float32; 2^u is what the gradient needs."""
    u = mx.minimum(mx.maximum(x * -_GELU_LOG2, -126.0), 126.0)  # 2^u stays a normal float32
    n = (u + _ROUNDING_MAGIC) - _ROUNDING_MAGIC
    two_to_n = mx.left_shift(n.astype(mx.int32) + 127, 23).view(mx.float32)
    power = _exp2_polynomial(u - n) * two_to_n
    return x / (1.0 + power), power


@on_current_stream
def _quick_gelu_function(stream):
    @mx.custom_function
    def quick_gelu(x):
        out, power = _quick_gelu_with_exp(x.astype(mx.float32))
        return out.astype(x.dtype), power

    @quick_gelu.vjp
    def quick_gelu_vjp(primals, cotangents, outputs):
        # d/dx x s(1.702 x) = s (1 + 1.702 x (1 - s)), with 1 - s = 2^u s exactly (no cancellation).
        x = primals if isinstance(primals, mx.array) else primals[0]
        with mx.stream(stream):
            sig = 1.0 / (1.0 + outputs[1])
            one_minus_sig = outputs[1] * sig  # in [0, 1]: x * 2^u alone would overflow for x << 0
            return ((cotangents[0] * sig * (1.0 + 1.702 * x * one_minus_sig)).astype(x.dtype),)

    return quick_gelu


def quick_gelu(x: mx.array) -> mx.array:
    """OpenAI's x * sigmoid(1.702 x), in two fused passes forward and one backward."""
    return _quick_gelu_function()(x)[0]


def _softmax(scores: mx.array) -> mx.array:
    shifted = scores.astype(mx.float32) - scores.max(axis=-1, keepdims=True).astype(mx.float32)
    weights = _exp(shifted)
    return (weights / weights.sum(axis=-1, keepdims=True)).astype(scores.dtype)


def _softmax_vjp(weights: mx.array, cotangent: mx.array) -> mx.array:
    return weights * (cotangent - (cotangent * weights).sum(axis=-1, keepdims=True))


@on_current_stream
def _softmax_functions(stream):
    # Autodiff through max / exp / sum / divide would write six intermediates per attention layer;
    # the closed form s (g - sum(g s)) needs the output alone.
    @mx.custom_function
    def softmax(scores):
        return _softmax(scores)

    @softmax.vjp
    def softmax_vjp(primals, cotangent, output):
        with mx.stream(stream):
            return (_softmax_vjp(output, cotangent),)

    @mx.custom_function
    def masked_softmax(scores, mask):
        return _softmax(scores + mask)

    @masked_softmax.vjp
    def masked_softmax_vjp(primals, cotangent, output):
        with mx.stream(stream):
            return _softmax_vjp(output, cotangent), mx.zeros_like(primals[1])

    return softmax, masked_softmax


def softmax(scores: mx.array, additive_mask: mx.array | None = None) -> mx.array:
    """Softmax over the last axis; `additive_mask` (0 or a large negative) is added first."""
    plain, masked = _softmax_functions()
    return plain(scores) if additive_mask is None else masked(scores, additive_mask)


@on_current_stream
def _linear_functions(stream):
    @mx.custom_function
    def linear(x, weight, bias):
        return mx.addmm(bias, x, weight.T)

    @linear.vjp
    def linear_vjp(primals, cotangent, output):
        x, weight, _ = primals
        with mx.stream(stream):
            rows = cotangent.reshape(-1, cotangent.shape[-1])  # (N, out)
            # The bias gradient as a (1, N) @ (N, out) product: BLAS sums the columns ~3x faster
            # than MLX's strided reduction over axis 0.
            ones = mx.ones((1, rows.shape[0]), dtype=rows.dtype)
            return cotangent @ weight, rows.T @ x.reshape(-1, x.shape[-1]), (ones @ rows).reshape(-1)

    @mx.custom_function
    def linear_no_bias(x, weight):
        return x @ weight.T

    @linear_no_bias.vjp
    def linear_no_bias_vjp(primals, cotangent, output):
        x, weight = primals
        with mx.stream(stream):
            rows = cotangent.reshape(-1, cotangent.shape[-1])
            return cotangent @ weight, rows.T @ x.reshape(-1, x.shape[-1])

    return linear, linear_no_bias


def linear(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    """x @ weight.T (+ bias), whose weight gradient is one contiguous (out, in) matmul."""
    with_bias, without_bias = _linear_functions()
    return without_bias(x, weight) if bias is None else with_bias(x, weight, bias)


def causal_mask(length: int, dtype=mx.float32) -> mx.array:
    """(L, L) additive mask: 0 on and below the diagonal, a large negative above it. Large rather
    than -inf, so a fully masked row cannot turn into inf - inf = nan."""
    keep = mx.tril(mx.ones((length, length), dtype=mx.bool_))
    return mx.where(keep, 0.0, -1e30).astype(dtype)
