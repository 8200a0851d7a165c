"""Fit the polynomial and rational coefficients used by mlxgpt/kernels.py (numpy only).

    python scripts/fit_kernels.py        # prints the constants (a few minutes)

Every fit minimises the maximum relative error on a dense grid: a weighted linear
least-squares solve, then Lawson's reweighting (weights multiplied by the error each
round), which converges towards the minimax (equal-ripple) solution. Rational fits are
linearised Sanathanan-Koerner style (``P - f Q = 0`` divided by the previous ``Q``),
solved in a variable scaled to ``[0, 1]`` and rejected if ``Q`` has a root in range.
Reference values are float64 (``math.erf``, ``numpy.tanh``/``exp``).

What is fitted (see mlxgpt/kernels.py for how each is used):

- ``e**r`` on ``|r| <= ln2 / 2``: a degree-6 polynomial.
- For each GELU, ``F`` with ``GELU(x) = x (1 + F(x)) / 2`` and ``G = F + x F'`` with
  ``GELU'(x) = (1 + G(x)) / 2`` (``F`` = erf(x / sqrt 2) or tanh(sqrt(2/pi) (x + 0.044715
  x^3))). Both are odd and reach +-1 in float32 at ``x_max``, so each is fitted as
  ``x p(x^2) / q(x^2)`` on ``0 <= x <= x_max`` and the kernel clamps ``x`` there. Then
  ``p`` is scaled (by less than 1e-6) so that the float32 evaluation at the clamp, in the
  kernel's order of operations, is exactly 1: GELU is then exactly ``x`` or ``0`` (and its
  derivative exactly 1 or 0) beyond the clamp instead of ``+-x * 1e-7``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

ROUNDS = 40  # plain least-squares rounds (rational fits: to settle Q)
LAWSON_ROUNDS = 400
GRID = 4001

SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
TANH_A = 0.044715


class OddFit(NamedTuple):
    name: str
    f: object  # float64 reference, odd, +-1 in float32 beyond x_max
    x_max: float
    degrees: tuple[int, int]


def _gelu_erf_f(x):
    return np.vectorize(math.erf)(x / math.sqrt(2))


def _gelu_erf_g(x):
    return _gelu_erf_f(x) + x * SQRT_2_OVER_PI * np.exp(-0.5 * x * x)


def _gelu_tanh_f(x):
    return np.tanh(SQRT_2_OVER_PI * (x + TANH_A * x**3))


def _gelu_tanh_g(x):
    t = _gelu_tanh_f(x)
    return t + x * (1 - t * t) * SQRT_2_OVER_PI * (1 + 3 * TANH_A * x * x)


# x_max: |F| is within 3e-8 of 1 beyond it (erf(4) = 1 - 1.5e-8; x e**(-x^2/2) and the
# tanh terms are below that there too).
ODD_FITS = (
    OddFit("GELU_ERF", _gelu_erf_f, 4 * math.sqrt(2), (5, 5)),
    OddFit("GELU_ERF_GRAD", _gelu_erf_g, 4.5 * math.sqrt(2), (7, 6)),
    OddFit("GELU_TANH", _gelu_tanh_f, 6.0, (5, 5)),
    OddFit("GELU_TANH_GRAD", _gelu_tanh_g, 6.0, (7, 6)),
)


def _vander(x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return x[:, None] ** np.arange(lo, hi + 1)


def fit_polynomial(f, x: np.ndarray, degree: int) -> tuple[float, np.ndarray]:
    """Coefficients (low to high) of the degree-``degree`` polynomial closest to ``f``."""
    fx = f(x)
    w = np.full_like(x, 1.0 / len(x))
    best = (math.inf, np.zeros(degree + 1))
    for _ in range(ROUNDS + LAWSON_ROUNDS):
        s = np.sqrt(w) / np.abs(fx)
        c, *_ = np.linalg.lstsq(_vander(x, 0, degree) * s[:, None], fx * s, rcond=None)
        err = (_vander(x, 0, degree) @ c - fx) / fx
        if np.max(np.abs(err)) < best[0]:
            best = (float(np.max(np.abs(err))), c)
        w = w * np.abs(err)
        w /= w.sum()
    return best


def fit_rational(f, x: np.ndarray, p: int, q: int) -> tuple[float, np.ndarray, np.ndarray]:
    """``P`` (degree p) and ``Q`` (degree q, ``Q[0] = 1``) with ``P/Q`` closest to ``f``."""
    scale = float(np.max(np.abs(x)))
    err, num, den = _fit_rational_unit(f(x), x / scale, p, q)
    return err, num / scale ** np.arange(p + 1), den / scale ** np.arange(q + 1)


def _fit_rational_unit(fx: np.ndarray, x: np.ndarray, p: int, q: int):
    w = np.full_like(x, 1.0 / len(x))
    q_prev = np.ones_like(x)
    best = (math.inf, None, None)
    for i in range(ROUNDS + LAWSON_ROUNDS):
        a = np.hstack([_vander(x, 0, p), -fx[:, None] * _vander(x, 1, q)])
        s = np.sqrt(w) / (np.abs(fx) * np.abs(q_prev))
        sol, *_ = np.linalg.lstsq(a * s[:, None], fx * s, rcond=None)
        num, den = sol[: p + 1], np.concatenate([[1.0], sol[p + 1 :]])
        q_prev = _vander(x, 0, q) @ den
        err = (_vander(x, 0, p) @ num / q_prev - fx) / fx
        m = float(np.max(np.abs(err)))
        if m < best[0] and np.min(q_prev) > 0:  # no pole inside the range
            best = (m, num, den)
        if i >= ROUNDS:
            w = w * np.abs(err)
            w /= w.sum()
    return best


def fit_exp() -> tuple[float, np.ndarray]:
    """``e**r`` on ``|r| <= ln2 / 2`` (the range left after ``x = n ln2 + r``), degree 6."""
    half = math.log(2) / 2
    return fit_polynomial(np.exp, np.linspace(-half, half, GRID), 6)


def fit_odd(fit: OddFit) -> tuple[float, np.ndarray, np.ndarray]:
    """``F(x) ~ x p(x^2) / q(x^2)`` on ``0 <= x <= x_max``; coefficients in ``u = x^2``."""
    x = np.linspace(0.0, fit.x_max, GRID)
    x[0] = 1e-6  # F(x) / x at 0 is the limit; any tiny x gives it to float64 accuracy

    def f_over_x(u: np.ndarray) -> np.ndarray:
        root = np.sqrt(u)
        return fit.f(root) / root

    return fit_rational(f_over_x, x * x, *fit.degrees)


def poly_f32(c, u: np.float32) -> np.float32:
    """mlxgpt.kernels._poly in float32, operation for operation (Estrin's scheme)."""
    c = [np.float32(v) for v in c]
    terms = [c[k] + c[k + 1] * u for k in range(0, len(c) - 1, 2)]
    if len(c) % 2:
        terms.append(c[-1])
    power = u * u
    while len(terms) > 1:
        pairs = [terms[k] + power * terms[k + 1] for k in range(0, len(terms) - 1, 2)]
        terms = pairs + terms[len(pairs) * 2 :]
        power = power * power
    return terms[0]


def odd_at_clamp_f32(p, q, x_max: float) -> np.float32:
    """``x_c * (p(u_c) / q(u_c))`` at the clamp, as the kernel computes it in float32."""
    x_c = np.float32(x_max)
    u_c = x_c * x_c
    return x_c * (poly_f32(p, u_c) / poly_f32(q, u_c))


def saturate(p: np.ndarray, q: np.ndarray, x_max: float) -> tuple[np.ndarray, np.ndarray]:
    """``p`` and ``q`` scaled (each by less than 2e-6) so that the value at the clamp is 1.

    Rounding makes the float32 value jump in steps of ~1e-7, so one factor alone may step
    over 1.0; the smallest pair of factors (in ``|i| + |j|`` steps of 2**-25) that lands
    on it is taken.
    """
    steps = sorted(
        ((i, j) for i in range(-64, 65) for j in range(-64, 65)),
        key=lambda t: abs(t[0]) + abs(t[1]),
    )
    for i, j in steps:
        p_s, q_s = p * (1 + i * 2.0**-25), q * (1 + j * 2.0**-25)
        if odd_at_clamp_f32(p_s, q_s, x_max) == np.float32(1.0):
            return p_s, q_s
    raise RuntimeError("no scaling of p and q makes the clamp value exactly 1")


def _show(name: str, coeffs) -> None:
    print(f"    {name}=(")
    for c in coeffs:
        print(f"        {float(c)!r},")
    print("    ),")


def main() -> None:
    err, c = fit_exp()
    print(f"# e**r: max relative error {err:.2e}")
    print("EXP_POLY = (" + ", ".join(repr(float(v)) for v in c) + ")")
    for fit in ODD_FITS:
        err, p, q = fit_odd(fit)
        p, q = saturate(p, q, fit.x_max)
        print(f"# {fit.name}: max relative error {err:.2e}")
        print(f"{fit.name} = OddRational(")
        _show("p", p)
        _show("q", q)
        print(f"    x_max={fit.x_max!r},")
        print(")")


if __name__ == "__main__":
    main()
