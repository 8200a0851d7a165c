"""mlxgpt.kernels computes the same functions as the straightforward MLX ones.

Each vectorisable form is checked against float64 references and against MLX's own
function (``nn.gelu``, ``nn.gelu_approx``, ``mx.softmax``, ``nn.losses.cross_entropy``,
``mx.fast.layer_norm``): values and gradients, edge cases (saturation, masking, NaN), and
the whole model with and without the CPU forms.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxgpt import kernels
from mlxgpt.config import GPTConfig
from mlxgpt.model import GPT, make_cache
from mlxgpt.train import loss_fn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import fit_kernels  # noqa: E402

SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
GRID = np.concatenate([np.linspace(-12, 12, 48001), [-1e30, -100.0, -7.0, 0.0, 7.0, 100.0]])


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf)(x)


def _reference(kind: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 GELU and its derivative."""
    if kind == "gelu":
        phi = 0.5 * (1 + _erf(x / math.sqrt(2)))
        return x * phi, phi + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    t = np.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x**3))
    grad = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
    return 0.5 * x * (1 + t), grad


def _value_and_grad(f, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xs = mx.array(x.astype(np.float32))
    y, dy = mx.compile(mx.value_and_grad(lambda v: f(v).sum()))(xs)
    return np.array(f(xs), dtype=np.float64), np.array(dy, dtype=np.float64)


@pytest.mark.parametrize(
    "kind, fast, simple",
    [("gelu", kernels.gelu, nn.gelu), ("gelu_tanh", kernels.gelu_tanh, nn.gelu_approx)],
)
def test_gelu_forms_match_float64_as_closely_as_mlx_own(kind, fast, simple):
    """Errors within 3e-7 * max(1, |x|): float32 rounding of values of size ~|x|."""
    x = GRID[np.abs(GRID) < 1e3]
    ref, dref = _reference(kind, x.astype(np.float32).astype(np.float64))
    scale = np.maximum(1.0, np.abs(x))
    y, dy = _value_and_grad(fast, x)
    assert np.max(np.abs(y - ref) / scale) < 3e-7
    assert np.max(np.abs(dy - dref) / scale) < 3e-7
    y_mlx, dy_mlx = _value_and_grad(simple, x)
    np.testing.assert_allclose(y, y_mlx, rtol=0, atol=1e-6 * scale.max())
    np.testing.assert_allclose(dy, dy_mlx, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fast", [kernels.gelu, kernels.gelu_tanh])
def test_gelu_saturates_exactly_like_relu(fast):
    """Past the fitted range GELU is exactly x or 0 (not +-1e-7 * x) and so is its slope."""
    x = np.array([-1e30, -1e4, -100.0, -8.0, 8.0, 100.0, 1e4, 1e30], np.float32)
    y, dy = _value_and_grad(fast, x)
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    np.testing.assert_array_equal(dy, (x > 0).astype(np.float64))


@pytest.mark.parametrize("fast", [kernels.gelu, kernels.gelu_tanh])
def test_gelu_special_values(fast):
    y = np.array(fast(mx.array([np.nan, np.inf, 0.0])))
    assert np.isnan(y[0]) and y[1] == np.inf and y[2] == 0.0


def test_gelu_keeps_the_input_dtype():
    x = mx.linspace(-3, 3, 7).astype(mx.bfloat16)
    assert kernels.gelu(x).dtype == mx.bfloat16
    assert mx.grad(lambda v: kernels.gelu(v).sum())(x).dtype == mx.bfloat16


def test_fit_script_emulates_the_kernel_polynomial_bit_for_bit():
    """scripts/fit_kernels.py tunes the clamp value with a float32 copy of kernels._poly."""
    u = np.random.default_rng(0).uniform(0, 40, 257).astype(np.float32)
    coeffs = kernels.GELU_ERF_GRAD.p
    ours = np.array(mx.compile(lambda v: kernels._poly(coeffs, v))(mx.array(u)))
    theirs = np.array([fit_kernels.poly_f32(coeffs, v) for v in u])
    np.testing.assert_array_equal(ours, theirs)
    for fit in (kernels.GELU_ERF, kernels.GELU_ERF_GRAD, kernels.GELU_TANH, kernels.GELU_TANH_GRAD):
        assert fit_kernels.odd_at_clamp_f32(fit.p, fit.q, fit.x_max) == 1.0


def _scores(shape, seed=0, masked=True):
    rng = np.random.default_rng(seed)
    s = rng.normal(0, 4, shape).astype(np.float32)
    if masked:
        t = shape[-1]
        s = s + np.triu(np.full((t, t), np.finfo(np.float32).min, np.float32), 1)
    return s


def test_exp_is_within_two_ulp_and_underflows_to_zero():
    d = np.concatenate([np.linspace(-88, 0, 200001), [-88.5, -1e4, -3.4e38]]).astype(np.float32)
    e = np.array(mx.compile(kernels._exp_shifted)(mx.array(d)[None], mx.zeros((1, 1))))[0]
    ref = np.exp(d.astype(np.float64))
    normal = ref > np.finfo(np.float32).tiny
    ulp = np.spacing(ref[normal].astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(e[normal] - ref[normal]) / ulp) <= 2
    assert np.all(e[d < -88] == 0)


def test_softmax_matches_mx_softmax_values_and_gradient():
    s = mx.array(_scores((2, 3, 17, 17)))
    g = mx.array(np.random.default_rng(1).normal(size=(2, 3, 17, 17)).astype(np.float32))
    p, dp = mx.vjp(kernels.softmax, [s], [g])
    p_ref, dp_ref = mx.vjp(lambda v: mx.softmax(v, axis=-1, precise=True), [s], [g])
    np.testing.assert_allclose(np.array(p), np.array(p_ref), rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(np.array(dp[0]), np.array(dp_ref[0]), rtol=1e-5, atol=1e-6)
    masked = np.triu(np.ones((17, 17), bool), 1)
    assert np.all(np.array(p)[..., masked] == 0)  # masked keys get exactly zero weight


def test_softmax_rows_with_extreme_values():
    rows = np.array(
        [[1e30, 0.0, -1e30], [-np.inf, 0.0, 1.0], [3.0, 3.0, 3.0], [np.nan, 0.0, 1.0]], np.float32
    )
    p = np.array(kernels.softmax(mx.array(rows)))
    np.testing.assert_array_equal(p[0], [1, 0, 0])
    np.testing.assert_allclose(p[1], [0, 1 / (1 + math.e), math.e / (1 + math.e)], rtol=1e-6)
    np.testing.assert_allclose(p[2], [1 / 3] * 3, rtol=1e-6)
    assert np.all(np.isnan(p[3]))


def test_cross_entropy_matches_mlx_values_and_gradient():
    rng = np.random.default_rng(2)
    logits = mx.array(rng.normal(0, 5, (64, 37)).astype(np.float32))
    logits[0, 3] = 80.0  # a confident row: no overflow
    targets = mx.array(rng.integers(0, 37, 64).astype(np.int32))
    ours = mx.value_and_grad(lambda v: kernels.cross_entropy(v, targets).mean())(logits)
    ref = mx.value_and_grad(lambda v: nn.losses.cross_entropy(v, targets, reduction="mean"))(logits)
    assert abs(ours[0].item() - ref[0].item()) < 1e-5
    np.testing.assert_allclose(np.array(ours[1]), np.array(ref[1]), rtol=1e-5, atol=1e-8)
    per_row = np.array(kernels.cross_entropy(logits, targets))
    np.testing.assert_allclose(per_row, np.array(nn.losses.cross_entropy(logits, targets)), 1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_matches_mx_fast_values_and_gradients(bias):
    rng = np.random.default_rng(3)
    x = mx.array((rng.normal(size=(4, 9, 48)) * 3 + 5).astype(np.float32))
    w = mx.array(rng.normal(size=48).astype(np.float32))
    b = mx.array(rng.normal(size=48).astype(np.float32)) if bias else None
    g = mx.array(rng.normal(size=(4, 9, 48)).astype(np.float32))
    args = [x, w, b] if bias else [x, w]

    def ours(*a):
        return kernels.layer_norm(a[0], a[1], a[2] if bias else None, 1e-5)

    def ref(*a):
        return mx.fast.layer_norm(a[0], a[1], a[2] if bias else None, 1e-5)

    y, grads = mx.vjp(ours, args, [g])
    y_ref, grads_ref = mx.vjp(ref, args, [g])
    np.testing.assert_allclose(np.array(y[0]), np.array(y_ref[0]), rtol=1e-5, atol=1e-5)
    for a, r in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(np.array(a), np.array(r), rtol=1e-4, atol=1e-4)


def test_cpu_forms_are_for_large_arrays_only():
    """Decoding one token handles a few hundred elements: MLX's own kernels are faster."""
    assert kernels.use_cpu_forms()  # these tests run on the CPU
    assert not kernels.use_cpu_forms(kernels.CPU_FORMS_MIN_SIZE - 1)
    assert kernels.use_cpu_forms(kernels.CPU_FORMS_MIN_SIZE)


@pytest.fixture
def cpu_forms_everywhere(monkeypatch):
    """Tiny test models use the CPU forms too (they are below the size threshold)."""
    monkeypatch.setattr(kernels, "CPU_FORMS_MIN_SIZE", 0)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("mask", ["causal", "none"])
def test_model_with_cpu_forms_equals_model_with_mlx_functions(
    monkeypatch, cpu_forms_everywhere, activation, mask
):
    """Same loss and same gradient for every parameter, whichever forms run."""
    cfg = GPTConfig(vocab_size=31, block_size=16, n_layer=2, n_head=2, n_embd=32)
    cfg.activation = activation
    mx.random.seed(4)
    model = GPT(cfg)
    x = mx.random.randint(0, 31, (3, 16))
    y = mx.random.randint(0, 31, (3, 16))
    value_and_grad = nn.value_and_grad(model, lambda m, a, b: loss_fn(m, a, b, mask=mask))
    fast = value_and_grad(model, x, y)
    monkeypatch.setattr(kernels, "use_cpu_forms", lambda size=None: False)
    simple = value_and_grad(model, x, y)
    assert abs(fast[0].item() - simple[0].item()) < 1e-5
    for (name, a), (_, b) in zip(tree_flatten(fast[1]), tree_flatten(simple[1]), strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-3, atol=2e-5, err_msg=name)


def test_cpu_attention_path_is_causal_and_matches_the_kv_cache(cpu_forms_everywhere):
    """With the CPU forms, a later token never changes earlier logits, and cached
    decoding (queries aligned bottom-right) gives the logits of the full pass."""
    cfg = GPTConfig(vocab_size=29, block_size=12, n_layer=2, n_head=2, n_embd=16)
    mx.random.seed(5)
    model = GPT(cfg)
    ids = np.random.default_rng(6).integers(0, 29, (2, 12))
    changed = ids.copy()
    changed[:, 7:] = (changed[:, 7:] + 1) % 29
    a, b = model(mx.array(ids)), model(mx.array(changed))
    np.testing.assert_array_equal(np.array(a[:, :7]), np.array(b[:, :7]))
    assert np.abs(np.array(a[:, 7:]) - np.array(b[:, 7:])).max() > 1e-4
    cache = make_cache(model)
    model(mx.array(ids[:, :5]), cache=cache)
    chunk = model(mx.array(ids[:, 5:]), cache=cache)
    np.testing.assert_allclose(np.array(chunk), np.array(a[:, 5:]), atol=1e-5)
