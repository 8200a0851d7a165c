"""Sampling semantics on hand-built distributions, and seeded reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlxgpt.errors import UserError
from mlxgpt.sampling import (
    MAX_SEED,
    MIN_TEMPERATURE,
    SamplingError,
    SamplingParams,
    filtered_probs,
    from_generation_config,
    generate_ids,
    sample_next,
    sample_rows,
    to_generation_config,
)

LOGITS = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))


def test_greedy_is_argmax_with_lowest_id_on_ties():
    assert sample_next(LOGITS, SamplingParams(temperature=0), np.random.default_rng(0)) == 0
    tied = np.array([1.0, 3.0, 3.0, 0.0])
    assert sample_next(tied, SamplingParams(temperature=0), np.random.default_rng(0)) == 1


def test_temperature_one_keeps_the_distribution():
    p = filtered_probs(LOGITS, SamplingParams(temperature=1.0))
    assert np.allclose(p, [0.5, 0.2, 0.15, 0.1, 0.05])


def test_temperature_sharpens_and_flattens():
    cold = filtered_probs(LOGITS, SamplingParams(temperature=0.5))
    hot = filtered_probs(LOGITS, SamplingParams(temperature=2.0))
    expected_cold = np.array([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2
    assert np.allclose(cold, expected_cold / expected_cold.sum())
    assert hot[0] < 0.5 < cold[0]


def test_top_k_keeps_exactly_k_tokens_renormalised():
    p = filtered_probs(LOGITS, SamplingParams(1.0, top_k=2))
    assert np.allclose(p, [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0])
    tied = filtered_probs(np.zeros(4), SamplingParams(1.0, top_k=2))
    assert np.allclose(tied, [0.5, 0.5, 0, 0])  # ties broken towards the lower id


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # cumulative: 0.5, 0.7, 0.85, 0.95, 1.0
    assert np.count_nonzero(filtered_probs(LOGITS, SamplingParams(1.0, top_p=0.5))) == 1
    assert np.count_nonzero(filtered_probs(LOGITS, SamplingParams(1.0, top_p=0.6))) == 2
    p = filtered_probs(LOGITS, SamplingParams(1.0, top_p=0.8))
    assert np.allclose(p, np.array([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    assert np.count_nonzero(filtered_probs(LOGITS, SamplingParams(1.0, top_p=1e-9))) == 1


def test_order_is_temperature_then_top_k_then_top_p():
    # temperature 0.5 squares the probabilities: 0.25,0.04,0.0225,... -> top token has 0.78,
    # so top_p=0.75 keeps one token; at temperature 1 it would keep two.
    params = SamplingParams(temperature=0.5, top_k=3, top_p=0.75)
    assert np.count_nonzero(filtered_probs(LOGITS, params)) == 1
    # top-p acts on the top-k distribution renormalised: 0.5/0.85=0.59, +0.2/0.85 = 0.82
    params = SamplingParams(temperature=1.0, top_k=3, top_p=0.75)
    p = filtered_probs(LOGITS, params)
    assert np.allclose(p, np.array([0.5, 0.2, 0, 0, 0]) / 0.7)


def test_sampling_frequencies_follow_the_filtered_distribution():
    rng = np.random.default_rng(0)
    params = SamplingParams(1.0, top_k=3)
    draws = np.bincount([sample_next(LOGITS, params, rng) for _ in range(6000)], minlength=5)
    assert draws[3] == draws[4] == 0
    assert np.allclose(draws[:3] / 6000, np.array([0.5, 0.2, 0.15]) / 0.85, atol=0.03)


def test_same_seed_same_tokens_different_seed_different_tokens():
    rng = np.random.default_rng(123)
    table = rng.normal(size=(50, 50)) * 3

    def step(new_ids, past_len):
        return table[new_ids[-1]]

    def run(seed):
        return list(generate_ids(step, [0], 40, 64, SamplingParams(1.0, seed=seed)))

    assert run(7) == run(7)
    assert run(7) != run(8)


@settings(max_examples=60, deadline=None)
@given(
    logits=st.lists(st.floats(-20, 20), min_size=1, max_size=30),
    temperature=st.floats(0.05, 5.0),
    top_k=st.integers(0, 35),
    top_p=st.floats(0.01, 1.0),
)
def test_filtered_distribution_is_valid(logits, temperature, top_k, top_p):
    params = SamplingParams(temperature=temperature, top_k=top_k or None, top_p=top_p)
    p = filtered_probs(np.array(logits), params)
    assert np.all(p >= 0) and p.sum() == pytest.approx(1.0)
    top2 = np.sort(np.array(logits))[-2:]
    if len(logits) == 1 or top2[1] - top2[0] > 1e-6:  # a unique most likely token survives
        assert p[int(np.argmax(logits))] > 0
    if top_k:
        assert np.count_nonzero(p) <= top_k
    token = sample_next(np.array(logits), params, np.random.default_rng(0))
    assert p[token] > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -2},
        {"temperature": float("nan")},
    ],
)
def test_invalid_sampling_settings_are_rejected(kwargs):
    with pytest.raises(SamplingError):  # a UserError: the CLIs print it as one error line
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": "hot"}, {"top_k": 2.5}, {"top_p": None}, {"temperature": float("inf")}],
)
def test_sampling_settings_of_the_wrong_type_are_a_user_error(kwargs):
    with pytest.raises(SamplingError):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1, 100_000_000_000_000, 1.5, "7", True])
def test_seeds_outside_the_allowed_range_are_refused_with_the_range(seed):
    with pytest.raises(SamplingError, match=r"seed must be a whole number from 0 to 4294967295"):
        SamplingParams(seed=seed)
    assert issubclass(SamplingError, UserError)


def test_the_largest_seed_works():
    params = SamplingParams(1.0, seed=MAX_SEED)
    assert sample_next(LOGITS, params, params.rng()) == sample_next(LOGITS, params, params.rng())
    assert MAX_SEED == 2**32 - 1 and SamplingParams(seed=np.int64(0)).seed == 0


@pytest.mark.parametrize("temperature", [5e-324, 1e-320, 1e-300, MIN_TEMPERATURE / 2])
def test_temperatures_too_small_to_divide_by_are_greedy(temperature):
    """1e-320 used to overflow the logits to NaN and always pick the last token."""
    logits = np.array([0.5, 3.0, 2.9999, -1.0, 1.0])
    params = SamplingParams(temperature, seed=0)
    assert params.greedy
    assert sample_next(logits, params, params.rng()) == 1
    np.testing.assert_array_equal(filtered_probs(logits, params), [0, 1, 0, 0, 0])
    assert to_generation_config(params, 5)["do_sample"] is False


def test_the_smallest_real_temperature_samples():
    params = SamplingParams(MIN_TEMPERATURE)
    assert not params.greedy
    p = filtered_probs(np.array([0.0, 1e-6, -1.0]), params)  # logits within 1e-5: both kept
    assert np.all(np.isfinite(p)) and p[0] > 0.4 and p[1] > 0.4 and p[2] == 0
    assert to_generation_config(params, 5) == {
        "do_sample": True, "temperature": MIN_TEMPERATURE, "top_k": 0, "top_p": 1.0,
        "max_new_tokens": 5,
    }  # fmt: skip


@pytest.mark.parametrize(
    "max_tokens, prompt, message",
    [(2.5, [1], "max_tokens must be a whole number"), (-1, [1], "max_tokens"), (3, [], "prompt")],
)
def test_bad_generation_arguments_fail_at_the_call(max_tokens, prompt, message):
    def step(new_ids, past_len):
        raise AssertionError("nothing may run")

    with pytest.raises(SamplingError, match=message):
        generate_ids(step, prompt, max_tokens, 16, SamplingParams())  # not iterated


def test_max_tokens_is_honoured_and_zero_is_allowed():
    def step(new_ids, past_len):
        return np.zeros(5)

    assert len(list(generate_ids(step, [1], 7, 16, SamplingParams(seed=0)))) == 7
    assert list(generate_ids(step, [1], 0, 16, SamplingParams(seed=0))) == []


def test_drawing_the_stop_token_ends_generation_without_yielding_it():
    script = [5, 6, 2, 7, 8]  # the arg-max token of each step

    def step(new_ids, past_len):
        logits = np.zeros(10)
        logits[script[past_len + len(new_ids) - 1]] = 1.0
        return logits

    greedy = SamplingParams(temperature=0)
    assert list(generate_ids(step, [1], 5, 16, greedy)) == [5, 6, 2, 7, 8]
    assert list(generate_ids(step, [1], 5, 16, greedy, stop_id=2)) == [5, 6]
    assert list(generate_ids(step, [1], 5, 16, greedy, stop_id=5)) == []


@pytest.mark.parametrize(
    "params",
    [SamplingParams(), SamplingParams(0.7), SamplingParams(1.3, top_k=5, top_p=0.9)],
    ids=["greedy", "temperature", "all"],
)
def test_generation_config_round_trip_keeps_the_meaning(params):
    values = to_generation_config(params, 77)
    assert from_generation_config(values) == (params, 77)
    # read the way transformers reads it: a missing top_k would mean 50
    assert values["do_sample"] == (params.temperature > 0)
    if values["do_sample"]:
        assert values["top_k"] == (params.top_k or 0)


@settings(max_examples=150, deadline=None)
@given(
    rows=st.integers(1, 12),
    vocab=st.sampled_from([2, 7, 65, 130, 1000, 50257]),
    scale=st.sampled_from([0.01, 1.0, 8.0, 40.0]),
    dtype=st.sampled_from([np.float32, np.float16, np.float64]),
    data=st.data(),
)
def test_sample_rows_picks_what_sample_next_picks_row_by_row(rows, vocab, scale, dtype, data):
    """The batched paths (greedy rows together, temperature-only rows as array operations)
    are the per-row rule exactly: same tokens, same random draws, for mixed settings."""
    settings_ = st.sampled_from(
        [
            SamplingParams(),
            SamplingParams(0.8),
            SamplingParams(1.0),
            SamplingParams(1.7),
            SamplingParams(0.05),
            SamplingParams(0.8, top_k=5),
            SamplingParams(0.8, top_p=0.9),
            SamplingParams(0.9, top_k=vocab),  # top-k that keeps everything: plain
        ]
    )
    params = [data.draw(settings_) for _ in range(rows)]
    seeds = [data.draw(st.integers(0, MAX_SEED)) for _ in range(rows)]
    logits = (np.random.default_rng(seeds[0]).standard_normal((rows, vocab)) * scale).astype(dtype)
    if data.draw(st.booleans()):  # exact ties, where the lowest id must win
        logits[:, vocab // 2] = logits[:, 0]
    batched = sample_rows(logits, params, [np.random.default_rng(s) for s in seeds])
    rngs = [np.random.default_rng(s) for s in seeds]
    one_by_one = [
        sample_next(row, p, rng) for row, p, rng in zip(logits, params, rngs, strict=True)
    ]
    assert batched == one_by_one
    # every row drew as many numbers as sample_next made it draw: the streams stay in step
    after = [np.random.default_rng(s) for s in seeds]
    batched_rngs = [np.random.default_rng(s) for s in seeds]
    sample_rows(logits, params, batched_rngs)
    for p, rng, fresh in zip(params, batched_rngs, after, strict=True):
        if not p.greedy:
            fresh.random()
        assert rng.random() == fresh.random()


def test_sample_rows_raises_like_sample_next_on_invalid_logits():
    logits = np.array([[0.0, 1.0], [np.nan, 0.0]], dtype=np.float32)
    with pytest.raises(ValueError, match="NaN or inf"):
        sample_rows(logits, [SamplingParams(0.8)] * 2, [np.random.default_rng(0)] * 2)
