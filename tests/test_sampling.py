"""Sampling semantics on hand-built distributions, and seeded reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlxgpt.sampling import (
    SamplingParams,
    filtered_probs,
    from_generation_config,
    generate_ids,
    sample_next,
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
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


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
