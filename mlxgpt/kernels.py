"""Elementwise math written so that MLX's CPU compiler turns it into vectorised loops.

Why this module exists
----------------------
The ``mlx[cpu]`` wheel's kernels are built without AVX/FMA and evaluate ``exp``, ``erf``
and ``tanh`` one element at a time through calls into the C library (``mx.exp`` makes
seven such calls per element). On a CPU that made GELU and the attention softmax more
than half of a training step. Under ``mx.compile``, MLX fuses elementwise operations
into one C++ loop built with ``g++ -O3`` (no ``-march``: baseline SSE2), and g++
vectorises that loop only when every operation in it is plain arithmetic: ``+ - * /``,
comparisons, ``minimum``/``maximum``, ``where``, ``abs``, float/int conversion and
constant shifts. Each function here computes its result from those operations alone.

What else shapes the code (read off the generated C++ and ``g++ -fopt-info-vec``):

- MLX fuses at most 11 levels of operations into one loop (mlx/compile.cpp; a constant
  operand counts one level more) and cuts a deeper graph wherever the limit falls,
  writing out every array that crosses the cut. Polynomials are therefore evaluated by
  Estrin's scheme (:func:`_poly`); each GELU is one loop forward and one backward.
- An intermediate used by two loops is written out; so is ``mx.view``'s input (not
  fusable), which :func:`_cut` uses to choose where a loop ends.
- g++ will not vectorise a loop in which a clamp against a *literal* lets it specialise
  the clamped path (:func:`_opaque`), nor a ``where`` with a division in one branch.
- A loop with a row-broadcast operand (``x - max``) runs strided, several times slower
  than a flat one: :func:`_exp_shifted` writes ``x - max`` out once.

What each function computes is the straightforward MLX function's value to float32
rounding; ``tests/test_kernels.py`` checks values and gradients against ``nn.gelu``,
``nn.gelu_approx``, ``mx.softmax``, ``nn.losses.cross_entropy`` and
``mx.fast.layer_norm``. All functions are correct on every device; :func:`use_cpu_forms`
tells the model when to prefer them (on the CPU; on a GPU MLX's own fused kernels are the
fast ones).

The constants come from ``scripts/fit_kernels.py`` (minimax fits against float64).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import mlx.core as mx


class OddRational(NamedTuple):
    """``F(x) = x p(x^2) / q(x^2)`` for ``|x| <= x_max``, ``sign(x)`` beyond (p, q low to high)."""

    p: tuple[float, ...]
    q: tuple[float, ...]
    x_max: float


# e**r ~ sum EXP_POLY[k] r**k on |r| <= ln2/2, max relative error 1.86e-09
EXP_POLY = (
    1.0000000005542415,
    1.0000000363281805,
    0.499999920792319,
    0.16666420147078134,
    0.041668225572476215,
    0.00837481773530159,
    0.001383685302220252,
)
# GELU_ERF: max relative error 2.46e-08 before rounding to float32
GELU_ERF = OddRational(
    p=(
        0.7978845411458947,
        0.06842913658318828,
        0.00938719050714964,
        0.00034324884965016234,
        1.257621096586316e-05,
        4.3901684077458056e-08,
    ),
    q=(
        1.0,
        0.252429481909834,
        0.02883767994940107,
        0.001900924690432887,
        7.409926817107134e-05,
        1.1693764352225555e-06,
    ),
    x_max=5.656854249492381,
)
# GELU_ERF_GRAD: max relative error 2.33e-08 before rounding to float32
GELU_ERF_GRAD = OddRational(
    p=(
        1.595769036856936,
        -0.014455251587218195,
        0.026293583722962248,
        0.0009621537912174516,
        6.413316900008934e-05,
        3.3054879756387624e-06,
        3.349843058124314e-08,
        -6.470894943783463e-11,
    ),
    q=(
        1.0,
        0.324274318530544,
        0.04957049793921773,
        0.0047076265433236356,
        0.0003076579065120886,
        1.3392234226293453e-05,
        5.098329968467543e-07,
    ),
    x_max=6.3639610306789285,
)
# GELU_TANH: max relative error 3.75e-08 before rounding to float32
GELU_TANH = OddRational(
    p=(
        0.7978845070763663,
        0.062115594662754264,
        0.007352821787479663,
        0.00027930769623589767,
        1.4257183608208433e-05,
        4.8091423991614135e-08,
    ),
    q=(
        0.9999999701976776,
        0.24534174421930266,
        0.02473652712052559,
        0.0013357145095278587,
        7.781406966984487e-05,
        1.319537387761165e-06,
    ),
    x_max=6.0,
)
# GELU_TANH_GRAD: max relative error 2.69e-08 before rounding to float32
GELU_TANH_GRAD = OddRational(
    p=(
        1.5957690787124195,
        -0.08440503260259141,
        0.0261449816586563,
        -0.0003171245477463163,
        5.398976242257267e-05,
        8.225735504160098e-07,
        2.2361456980648097e-08,
        -6.517431531706466e-11,
    ),
    q=(
        1.0,
        0.2820896652987664,
        0.03416627653301785,
        0.002067368263692877,
        0.00014599215445356588,
        5.157407161526206e-06,
        2.3008937744604541e-07,
    ),
    x_max=6.0,
)

LOG2E = 1.4426950408889634
# ln 2 split so that n * LN2_HI is exact for |n| < 2**15 (LN2_HI has 9 significant bits).
LN2_HI = 0.693359375
LN2_LO = -2.1219444005469057e-04
ROUND_MAGIC = 12582912.0  # 1.5 * 2**23: (v + M) - M rounds v to an integer (|v| < 2**22)
EXP_MIN = -88.0  # e**(x - m) for x - m below this is 0 (the result would be subnormal)
SQRT_2_OVER_PI = 0.7978845608028654
TANH_A = 0.044715  # GELU_tanh: tanh(sqrt(2/pi) (x + 0.044715 x^3))


# Below this many elements an operation costs its dispatch, not its arithmetic, and the
# forms here (several fused loops and custom gradients per function) lose to MLX's one
# kernel: decoding one token (arrays of a few hundred elements) ran at 600 instead of 900
# tokens/s with them. Training and prompt arrays are 10^4 to 10^7 elements.
CPU_FORMS_MIN_SIZE = 8192


def use_cpu_forms(size: int | None = None) -> bool:
    """True on the CPU (where the forms here are the fast ones) for ``size`` >= 8192 elements.

    Without ``size``: whether arrays are computed on the CPU at all.
    """
    on_cpu = mx.default_device().type == mx.DeviceType.cpu
    return on_cpu and (size is None or size >= CPU_FORMS_MIN_SIZE)


def _poly(c: tuple[float, ...], u: mx.array) -> mx.array:
    """``sum c[k] u**k`` by Estrin's scheme: pairs ``c[k] + c[k+1] u``, combined by ``u**2``,
    ``u**4``: 5 levels deep for up to 7 coefficients, 6 for 8 (Horner: 2 per coefficient).
    """
    terms = [c[k] + c[k + 1] * u for k in range(0, len(c) - 1, 2)]
    if len(c) % 2:
        terms.append(mx.array(c[-1], u.dtype))
    power = u * u
    while len(terms) > 1:
        pairs = [terms[k] + power * terms[k + 1] for k in range(0, len(terms) - 1, 2)]
        terms = pairs + terms[len(pairs) * 2 :]
        power = power * power
    return terms[0]


def _opaque(value: float) -> mx.array:
    """A float32 scalar whose value the generated C++ does not contain as a literal.

    Clamping to a *literal* lets g++ specialise the clamped path (``c * c`` becomes a
    constant there), which puts arithmetic under a branch and stops vectorisation (it
    will not if-convert floating-point operations that might trap). A bound read from
    memory avoids that. Scalars made by a non-fusable operation (``mx.view``) are passed
    to the loop by pointer instead of being printed into its source.
    """
    return mx.view(mx.view(mx.array(value, mx.float32), mx.int32), mx.float32)


def _odd(f: OddRational, x: mx.array) -> mx.array:
    """``F(x)``: ``x p(u) / q(u)`` (``u = x^2``) inside the range, exactly ``+-1`` beyond.

    Past ``x_max`` the clamped ``x_c``, ``u_c`` make the value the one at the clamp, which
    the fit tuned to be exactly 1 in float32. 9 levels deep.
    """
    x_max = _opaque(f.x_max)
    x_c = mx.minimum(mx.maximum(x, -x_max), x_max)
    u_c = mx.minimum(x * x, x_max * x_max)
    return x_c * (_poly(f.p, u_c) / _poly(f.q, u_c))


def _gelu_form(f: OddRational, x: mx.array) -> mx.array:
    """``x (1 + F(x)) / 2``: both GELUs have this form (``F`` = erf(x/sqrt2) or tanh(y)).

    Computed in float32 (the fits are float32-accurate), returned in ``x``'s dtype.
    """
    x32 = x.astype(mx.float32)
    half_x = 0.5 * x32
    return (half_x + half_x * _odd(f, x32)).astype(x.dtype)


def _gelu_form_grad(f: OddRational, x: mx.array, g: mx.array) -> mx.array:
    """``g (1 + G(x)) / 2`` with ``G = F + x F'``: the chain rule for :func:`_gelu_form`."""
    half_g = 0.5 * g.astype(mx.float32)
    return (half_g + half_g * _odd(f, x.astype(mx.float32))).astype(g.dtype)


_gelu_fwd = mx.compile(partial(_gelu_form, GELU_ERF))
_gelu_bwd = mx.compile(partial(_gelu_form_grad, GELU_ERF_GRAD))
_gelu_tanh_fwd = mx.compile(partial(_gelu_form, GELU_TANH))
_gelu_tanh_bwd = mx.compile(partial(_gelu_form_grad, GELU_TANH_GRAD))


@mx.custom_function
def gelu(x: mx.array) -> mx.array:
    """Exact GELU ``x (1 + erf(x / sqrt 2)) / 2``, the function ``nn.gelu`` computes.

    One fused loop forward, one backward (``GELU' = Phi(x) + x phi(x)``, fitted as a whole).
    """
    return _gelu_fwd(x)


@gelu.vjp
def _gelu_vjp(x, cotangent, output):
    return _gelu_bwd(x, cotangent)


@mx.custom_function
def gelu_tanh(x: mx.array) -> mx.array:
    """GPT-2's ``x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2``, as ``nn.gelu_approx``."""
    return _gelu_tanh_fwd(x)


@gelu_tanh.vjp
def _gelu_tanh_vjp(x, cotangent, output):
    return _gelu_tanh_bwd(x, cotangent)


def _cut(x: mx.array) -> mx.array:
    """``x`` itself, but written to memory here: the fused loop that computes it ends.

    Viewing the bits as int32 and back is free (no copy) and is not fusable.
    """
    return mx.view(mx.view(x, mx.int32), x.dtype)


def _exp_shifted(x: mx.array, m: mx.array) -> mx.array:
    """``e**(x - m)`` for ``x <= m`` (``m``: the maximum along the last axis), in three loops.

    Cody-Waite: ``x - m = n ln2 + r`` with integer ``n`` and ``|r| <= ln2 / 2``; then
    ``e**r`` by a degree-6 polynomial (relative error 2e-9) times ``2**n`` built from its
    exponent bits, within 2 ulp of ``e**(x - m)``. Arguments below -88 (masked entries:
    ``finfo.min``) give exactly 0: ``n = -127`` has all-zero bits.

    Loop 1 writes ``d = x - m``: ``m`` is broadcast along the last axis, and only loops
    whose inputs all have the output's layout run as one flat, vectorised loop. Loop 2
    writes the bits (``mx.view`` is not fusable), loop 3 computes the rest; ``n`` is
    recovered exactly from the bits (``float(bits) = (n + 127) * 2**23``) so that loop 2
    has a single output.
    """
    d = _cut(mx.maximum(x - m, EXP_MIN))
    n = (d * LOG2E + ROUND_MAGIC) - ROUND_MAGIC
    bits = (n.astype(mx.int32) + 127) << 23  # float32 bits of 2**n: exponent n + 127
    kf = bits.astype(mx.float32)
    n_hi = kf * (LN2_HI * 2.0**-23) - 127.0 * LN2_HI  # n * LN2_HI, exact
    n_lo = kf * (LN2_LO * 2.0**-23) - 127.0 * LN2_LO
    r = (d - n_hi) - n_lo
    return _poly(EXP_POLY, r) * mx.view(bits, mx.float32)


@mx.custom_function
@mx.compile
def softmax(x: mx.array) -> mx.array:
    """``mx.softmax(x, axis=-1)``: ``e**(x - max)`` normalised; ``finfo.min`` entries give 0."""
    e = _exp_shifted(x, mx.max(x, axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@softmax.vjp
def _softmax_vjp(x, cotangent, p):
    return p * (cotangent - (p * cotangent).sum(axis=-1, keepdims=True))


@mx.compile
def _log_softmax_parts(logits: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    m = mx.max(logits, axis=-1, keepdims=True)
    e = _exp_shifted(logits, m)
    s = e.sum(axis=-1, keepdims=True)
    return m, e, s


@mx.custom_function
def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-position ``-log softmax(logits)[target]`` (``nn.losses.cross_entropy``, no reduction).

    ``logsumexp - logit[target]``, the sum of exponentials taken after subtracting the row
    maximum. The gradient is ``softmax - one_hot(target)``.
    """
    m, _, s = _log_softmax_parts(logits)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)
    return (m + mx.log(s) - picked).squeeze(-1)


@cross_entropy.vjp
def _cross_entropy_vjp(primals, cotangent, output):
    logits, targets = primals
    _, e, s = _log_softmax_parts(logits)
    one_hot = mx.arange(logits.shape[-1]) == targets[..., None]
    grad = cotangent[..., None] * (e / s - one_hot)
    return grad, mx.zeros_like(targets)


def _row_mean(x: mx.array) -> mx.array:
    """Mean over the last axis as a matrix-vector product (BLAS), shape ``(..., 1)``.

    MLX's CPU reductions add one element at a time; the same sum done by the (vectorised,
    already loaded) BLAS GEMV is several times faster.
    """
    return x @ mx.full((x.shape[-1], 1), 1.0 / x.shape[-1], x.dtype)


def _layer_norm_stats(x: mx.array, eps: mx.array) -> tuple[mx.array, mx.array]:
    mean = _row_mean(x)
    centered = x - mean
    return mean, mx.rsqrt(_row_mean(centered * centered) + eps)


@mx.custom_function
def _layer_norm(x: mx.array, weight: mx.array, bias: mx.array, eps: mx.array) -> mx.array:
    mean, rstd = _layer_norm_stats(x, eps)
    return (x - mean) * rstd * weight + bias


@_layer_norm.vjp
def _layer_norm_vjp(primals, g, output):
    x, weight, bias, eps = primals
    mean, rstd = _layer_norm_stats(x, eps)
    x_hat = (x - mean) * rstd
    wg = g * weight
    dx = rstd * (wg - _row_mean(wg) - x_hat * _row_mean(wg * x_hat))
    rows = tuple(range(x.ndim - 1))
    return dx, (g * x_hat).sum(axis=rows), g.sum(axis=rows), mx.zeros_like(eps)


def layer_norm(x: mx.array, weight: mx.array | None, bias: mx.array | None, eps: float):
    """``mx.fast.layer_norm``: ``(x - mean) / sqrt(var + eps) * weight + bias`` over the last
    axis, with the backward pass written out (MLX differentiates its CPU fallback op by
    op) and the row means taken by BLAS (:func:`_row_mean`). For float32 ``x``.
    """
    c = x.shape[-1]
    weight = mx.ones((c,), x.dtype) if weight is None else weight
    bias = mx.zeros((c,), x.dtype) if bias is None else bias
    return _layer_norm(x, weight, bias, mx.array(eps, x.dtype))
