"""MLX and the exported ONNX graph (onnxruntime) compute the same logits and tokens.

Every test runs for several random tiny configs and a briefly trained checkpoint, in both
attention forms (portable opset 17, fused opset 23).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_export_support import CONFIGS, mlx_logits, mlx_model, write_random_checkpoint

from mlxgpt.checkpoint import read_config, read_weights, resolve
from mlxgpt.generate import generate_tokens
from mlxgpt.sampling import SamplingParams
from mlxgpt_export.exporter import export_checkpoint
from mlxgpt_export.parity import reference_logits
from mlxgpt_export.runtime import OnnxGPT

ATOL = 1e-4  # float32
MODELS = [*CONFIGS, "trained"]
FORMS = ["portable", "fused"]


@pytest.fixture(scope="module", params=MODELS)
def checkpoint(request, tmp_path_factory) -> Path:
    if request.param == "trained":
        return resolve(request.getfixturevalue("trained_ckpt"))
    directory = tmp_path_factory.mktemp(request.param) / "ckpt"
    return write_random_checkpoint(directory, CONFIGS[request.param], seed=len(request.param))


@pytest.fixture(scope="module", params=FORMS)
def case(request, checkpoint: Path, tmp_path_factory):
    """(MLX model, onnxruntime model) of one checkpoint in one attention form."""
    out = tmp_path_factory.mktemp("onnx") / request.param
    export_checkpoint(checkpoint, out, attention=request.param, quiet=True)
    model, _ = mlx_model(checkpoint)
    return model, OnnxGPT.load(out)


def random_ids(ort: OnnxGPT, n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, ort.config.vocab_size, n).tolist()


def test_prompt_processing(case):
    mlx, ort = case
    ids = random_ids(ort, ort.config.block_size)  # every position of the window
    (expected,) = mlx_logits(mlx, [ids])
    logits, _ = ort.forward([ids])
    np.testing.assert_allclose(logits[0], expected, atol=ATOL, rtol=0)


def test_one_token_decode_step(case):
    mlx, ort = case
    ids = random_ids(ort, 9, seed=1)
    _, expected = mlx_logits(mlx, [ids[:-1], ids[-1:]])
    _, past = ort.forward([ids[:-1]])
    logits, present = ort.forward([ids[-1:]], past=past)
    np.testing.assert_allclose(logits[0], expected, atol=ATOL, rtol=0)
    assert present[0][0].shape[2] == 9


def test_chunk_after_existing_past(case):
    mlx, ort = case
    ids = random_ids(ort, 14, seed=2)
    first, second = mlx_logits(mlx, [ids[:6], ids[6:]])
    logits1, past = ort.forward([ids[:6]])
    logits2, _ = ort.forward([ids[6:]], past=past)
    np.testing.assert_allclose(logits1[0], first, atol=ATOL, rtol=0)
    np.testing.assert_allclose(logits2[0], second, atol=ATOL, rtol=0)


def left_padded(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    return ids, mask


def test_left_padded_batch_matches_each_prompt_alone(case):
    """Prefill and one decode step of a left-padded batch, row by row against MLX."""
    mlx, ort = case
    prompts = [random_ids(ort, n, seed=n) for n in (11, 6, 1, 3)]
    nxt = random_ids(ort, len(prompts), seed=99)
    ids, mask = left_padded(prompts)
    logits, past = ort.forward(ids, mask)
    mask = np.hstack([mask, np.ones((len(prompts), 1), np.int64)])
    step, _ = ort.forward(np.array(nxt)[:, None], mask, past=past)
    for row, prompt in enumerate(prompts):
        prefill, decode = mlx_logits(mlx, [prompt, [nxt[row]]])
        np.testing.assert_allclose(logits[row, -len(prompt) :], prefill, atol=ATOL, rtol=0)
        np.testing.assert_allclose(step[row, 0], decode[0], atol=ATOL, rtol=0)


def test_no_nan_for_a_fully_padded_row(case):
    """A row whose attention_mask is all zeros stays finite in every layer, then and later."""
    _, ort = case
    ids = np.array([random_ids(ort, 7, seed=3)] * 2)
    mask = np.ones_like(ids)
    mask[1] = 0
    logits, past = ort.forward(ids, mask)
    step, present = ort.forward(ids[:, :1], np.hstack([mask, [[1], [0]]]), past=past)
    for tensor in [logits, step] + [t for kv in past + present for t in kv]:
        assert np.isfinite(tensor).all()


def test_causality_of_the_exported_graph(case):
    """Changing future tokens never changes the logits of earlier positions."""
    _, ort = case
    n = 12
    ids = random_ids(ort, n, seed=4)
    base, _ = ort.forward([ids])
    _, past = ort.forward([ids[:4]])
    base_chunk, _ = ort.forward([ids[4:]], past=past)
    for t in (0, 5, n - 2):
        changed = ids[: t + 1] + [(i + 1) % ort.config.vocab_size for i in ids[t + 1 :]]
        logits, _ = ort.forward([changed])
        np.testing.assert_allclose(logits[0, : t + 1], base[0, : t + 1], atol=1e-6, rtol=0)
        assert not np.allclose(logits[0, t + 1 :], base[0, t + 1 :])  # the change did reach
        if t >= 4:  # the same, in a chunk processed after a past
            chunk, _ = ort.forward([changed[4:]], past=past)
            np.testing.assert_allclose(chunk[0, : t - 3], base_chunk[0, : t - 3], atol=1e-6)


def test_greedy_64_tokens_identical_three_ways(case):
    """MLX with its KV cache, onnxruntime with the cache, onnxruntime recomputing: same ids.

    64 tokens overflow every test model's window, so the sliding window is exercised too.
    """
    mlx, ort = case
    prompt = random_ids(ort, 5, seed=5)
    greedy = SamplingParams(temperature=0.0)
    block = ort.config.block_size
    expected = list(generate_tokens(mlx, prompt, 64, greedy, use_cache=True))
    assert list(ort.generate_ids(prompt, 64, greedy, use_cache=True)) == expected
    assert list(ort.generate_ids(prompt, 64, greedy, use_cache=False)) == expected
    assert len(prompt) + 64 > block


def test_numpy_reference_matches_mlx(checkpoint: Path):
    """The exporter's own parity check uses a numpy reference; check it against MLX."""
    mlx, _ = mlx_model(checkpoint)
    config = read_config(checkpoint)
    ids = np.random.default_rng(6).integers(0, config.vocab_size, (1, config.block_size))
    (expected,) = mlx_logits(mlx, [ids[0].tolist()])
    reference = reference_logits(read_weights(checkpoint, config), config, ids)
    np.testing.assert_allclose(reference[0], expected, atol=ATOL, rtol=0)
