"""The model's promises: causality, honest parallel loss, KV-cache equivalence, layout."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlxgpt.config import GPTConfig
from mlxgpt.generate import generate_tokens
from mlxgpt.model import GPT, MLP, causal_mask, make_cache
from mlxgpt.sampling import SamplingParams
from mlxgpt.train import loss_fn

CFG = GPTConfig(vocab_size=23, block_size=24, n_layer=2, n_head=3, n_embd=24)


@pytest.fixture(scope="module")
def model() -> GPT:
    mx.random.seed(0)
    m = GPT(CFG)
    m.eval()
    return m


def test_causal_mask_is_lower_triangular_and_bottom_right_aligned():
    m = np.array(causal_mask(4, 4))
    neg = np.finfo(np.float32).min
    assert np.array_equal(m == 0, np.tril(np.ones((4, 4), bool)))
    assert np.all(m[np.triu_indices(4, 1)] == neg)
    assert np.isfinite(m).all()  # never -inf: a masked row can never turn into NaN
    # two new queries after a past of 3: query i sees keys 0..3+i
    m = np.array(causal_mask(2, 5))
    assert np.array_equal(m == 0, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])


def test_fused_and_explicit_attention_agree(model):
    x = mx.random.randint(0, CFG.vocab_size, (3, 17))
    fused = model(x, mask="causal")
    explicit = model(x, mask="explicit")
    assert np.allclose(np.array(fused), np.array(explicit), atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    data=st.data(),
    length=st.integers(min_value=2, max_value=CFG.block_size),
    mask=st.sampled_from(["causal", "explicit"]),
)
def test_future_tokens_never_change_past_logits(model, data, length, mask):
    """Changing tokens after position t leaves logits at <= t unchanged; earlier ones don't."""
    ids = data.draw(st.lists(st.integers(0, CFG.vocab_size - 1), min_size=length, max_size=length))
    t = data.draw(st.integers(0, length - 2))
    changed = list(ids)
    for j in range(t + 1, length):
        changed[j] = (changed[j] + 1 + data.draw(st.integers(0, 5))) % CFG.vocab_size
    a = np.array(model(mx.array([ids]), mask=mask))
    b = np.array(model(mx.array([changed]), mask=mask))
    assert np.allclose(a[0, : t + 1], b[0, : t + 1], atol=1e-5)
    assert not np.allclose(a[0, t + 1 :], b[0, t + 1 :], atol=1e-5)
    # a change *before* t does reach position t
    earlier = list(ids)
    earlier[0] = (earlier[0] + 1) % CFG.vocab_size
    c = np.array(model(mx.array([earlier]), mask=mask))
    assert not np.allclose(a[0, t], c[0, t], atol=1e-6)


def test_without_the_mask_the_future_leaks(model):
    """The teaching device: with mask='none' position 0 does see later tokens."""
    ids = list(range(10))
    changed = ids[:5] + [(i + 3) % CFG.vocab_size for i in ids[5:]]
    a = np.array(model(mx.array([ids]), mask="none"))
    b = np.array(model(mx.array([changed]), mask="none"))
    assert not np.allclose(a[0, 0], b[0, 0], atol=1e-6)


def test_one_pass_loss_equals_average_of_prefix_losses(model):
    rng = np.random.default_rng(0)
    seq = rng.integers(0, CFG.vocab_size, size=(2, 13))
    x, y = mx.array(seq[:, :-1]), mx.array(seq[:, 1:])
    parallel = loss_fn(model, x, y).item()
    per_position = []
    for t in range(x.shape[1]):
        logits = model(x[:, : t + 1])[:, -1].astype(mx.float32)
        per_position.append(nn.losses.cross_entropy(logits, y[:, t], reduction="mean").item())
    assert parallel == pytest.approx(float(np.mean(per_position)), abs=1e-5)


def test_kv_cache_matches_recomputation(model):
    prompt = [1, 5, 7, 2]
    cached = list(generate_tokens(model, prompt, 16, SamplingParams(temperature=0)))
    full = list(generate_tokens(model, prompt, 16, SamplingParams(temperature=0), use_cache=False))
    assert cached == full
    # logits of every step agree within 1e-4
    ids = prompt + cached
    cache = make_cache(model)
    step_logits = [model(mx.array([prompt]), cache=cache)[0, -1]]
    for tok in cached[:-1]:
        step_logits.append(model(mx.array([[tok]]), cache=cache)[0, -1])
    whole = model(mx.array([ids[:-1]]))[0, len(prompt) - 1 :]
    assert np.abs(np.array(mx.stack(step_logits)) - np.array(whole)).max() < 1e-4


def test_generation_beyond_the_context_window_slides(model):
    """Past block_size tokens the window slides; cache and recomputation still agree."""
    prompt = [3] * (CFG.block_size + 5)  # longer than the context: cropped
    params = SamplingParams(temperature=0)
    n = CFG.block_size
    cached = list(generate_tokens(model, prompt, n, params))
    full = list(generate_tokens(model, prompt, n, params, use_cache=False))
    assert cached == full and len(cached) == n


def test_sequence_longer_than_context_is_a_clear_error(model):
    with pytest.raises(ValueError, match="context window"):
        model(mx.zeros((1, CFG.block_size + 1), dtype=mx.int32))


def test_parameter_names_follow_gpt2_layout(model):
    names = set(model.state_dict())
    for expected in [
        "wte.weight",
        "wpe.weight",
        "h.0.ln_1.weight",
        "h.0.ln_1.bias",
        "h.1.attn.c_attn.weight",
        "h.1.attn.c_proj.weight",
        "h.0.ln_2.weight",
        "h.0.mlp.c_fc.weight",
        "h.0.mlp.c_proj.bias",
        "ln_f.weight",
    ]:
        assert expected in names
    assert not any("lm_head" in n for n in names)  # tied to wte


def test_gpt2_initialisation():
    mx.random.seed(1)
    cfg = GPTConfig(vocab_size=500, block_size=64, n_layer=8, n_head=4, n_embd=128)
    m = GPT(cfg)
    w = m.state_dict()
    assert np.std(np.array(w["wte.weight"])) == pytest.approx(0.02, rel=0.05)
    assert np.std(np.array(w["h.0.mlp.c_fc.weight"])) == pytest.approx(0.02, rel=0.05)
    resid = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert np.std(np.array(w["h.0.mlp.c_proj.weight"])) == pytest.approx(resid, rel=0.05)
    assert np.std(np.array(w["h.0.attn.c_proj.weight"])) == pytest.approx(resid, rel=0.1)
    assert np.all(np.array(w["h.0.ln_1.weight"]) == 1) and np.all(np.array(w["ln_f.bias"]) == 0)


def test_no_bias_option_removes_all_biases():
    m = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, bias=False))
    assert not [n for n in m.state_dict() if n.endswith("bias")]


def test_bfloat16_parameters_keep_a_float32_loss():
    m = GPT(CFG)
    m.set_dtype(mx.bfloat16)
    x = mx.random.randint(0, CFG.vocab_size, (2, 9))
    assert m(x).dtype == mx.bfloat16
    loss = loss_fn(m, x, x)
    assert loss.dtype == mx.float32 and math.isfinite(loss.item())


@pytest.mark.parametrize("mask", ["causal", "explicit"])
def test_cached_chunk_sees_the_past_and_its_own_earlier_tokens(model, mask):
    """With a KV cache the mask is aligned to the newest queries (bottom-right)."""
    ids = mx.array([[4, 8, 15, 16, 22, 19, 7, 1, 9]])
    cache = make_cache(model)
    model(ids[:, :5], mask=mask, cache=cache)
    chunk = model(ids[:, 5:], mask=mask, cache=cache)  # 4 new queries after a past of 5
    full = model(ids, mask=mask)[:, 5:]
    assert np.abs(np.array(chunk) - np.array(full)).max() < 1e-5


def test_activation_choice_changes_the_mlp_as_documented():
    """ "gelu" is erf GELU; "gelu_tanh" is GPT-2's tanh form (differs by up to ~5e-4)."""
    x = mx.linspace(-6, 6, 1001)
    exact = MLP(GPTConfig(activation="gelu")).activation(x)
    tanh = MLP(GPTConfig(activation="gelu_tanh")).activation(x)
    xs = np.array(x, dtype=np.float64)
    erf = np.vectorize(math.erf)(xs / math.sqrt(2))
    np.testing.assert_allclose(np.array(exact), 0.5 * xs * (1 + erf), atol=1e-5)
    inner = math.sqrt(2 / math.pi) * (xs + 0.044715 * xs**3)
    np.testing.assert_allclose(np.array(tanh), 0.5 * xs * (1 + np.tanh(inner)), atol=1e-5)
    assert 1e-4 < float(mx.abs(exact - tanh).max()) < 1e-3
