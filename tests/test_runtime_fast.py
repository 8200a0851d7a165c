"""The generation loops' fast paths (``_Decoder``, ``_InPlaceDecoder``) against ``forward``.

The loops run the graph without re-checking their own inputs and hand each step's
``present.*`` arrays to the next step as they are. These tests hold that path to the
numpy ``forward()`` contract: same logits (within 1e-5) and identical tokens, greedy and
sampled, alone and batched, across the window slide; a graph whose KV cache is float16
gets float16 pasts on both paths; and the public ``cached_step`` still refuses bad ids.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from mlxgpt import sampling
from mlxgpt.sampling import SamplingParams
from mlxgpt_export import signature as sig
from mlxgpt_export.errors import InputError
from mlxgpt_export.runtime import (
    MODEL_FILE,
    OnnxGPT,
    _Decoder,
    _InPlaceDecoder,
    next_tokens,
    unchecked_run,
)

PARAMS = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, top_k=8, seed=3)]


def forward_step(model: OnnxGPT) -> sampling.StepFn:
    """The KV-cache step built on the public, checked ``forward`` (numpy pasts)."""
    past = None

    def step(new_ids, past_len):
        nonlocal past
        logits, past = model.forward([list(new_ids)], past=None if past_len == 0 else past)
        return logits[0, -1]

    return step


def reference_ids(model: OnnxGPT, prompt: list[int], n: int, params: SamplingParams) -> list:
    block = model.config.block_size
    return list(sampling.generate_ids(forward_step(model), prompt, n, block, params))


def padded(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, prompts))
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = prompt, 1
    return ids, mask


def make_decoder(model: OnnxGPT, batch: int, kind: str) -> _Decoder | _InPlaceDecoder:
    """A decoder on the exported graph, or on its in-place rewrite (mlxgpt_export.in_place)."""
    if kind == "exported graph":
        return _Decoder(model, batch)
    return _InPlaceDecoder(model, batch, model.in_place_session())


@pytest.mark.parametrize("kind", ["exported graph", "in place"])
def test_decoder_logits_equal_forward_for_a_padded_batch(ort: OnnxGPT, kind: str):
    """Prompt, then three single-token steps and a two-token chunk: logits within 1e-5."""
    prompts = [[5, 9, 2, 7, 1], [3], [8, 8, 4]]
    ids, mask = padded(prompts)
    decoder = make_decoder(ort, len(prompts), kind)
    logits, past = ort.forward(ids, mask)
    np.testing.assert_allclose(decoder.start(ids, mask), logits[:, -1], atol=1e-5, rtol=0)
    rng = np.random.default_rng(0)
    for new in (1, 1, 1, 2):
        chunk = rng.integers(0, ort.config.vocab_size, (len(prompts), new))
        mask = np.concatenate([mask, np.ones_like(chunk)], axis=1)
        logits, past = ort.forward(chunk, mask, past=past)
        np.testing.assert_allclose(decoder.extend(chunk), logits[:, -1], atol=1e-5, rtol=0)
    assert decoder.length == mask.shape[1]


@pytest.mark.parametrize("params", PARAMS, ids=["greedy", "sampled"])
def test_generate_ids_equals_the_forward_loop_across_the_slide(ort: OnnxGPT, params):
    """70 tokens after a 20-token prompt in a 32-token window: slides many times."""
    prompt = np.random.default_rng(1).integers(0, ort.config.vocab_size, 20).tolist()
    expected = reference_ids(ort, prompt, 70, params)
    assert list(ort.generate_ids(prompt, 70, params)) == expected
    assert list(ort.generate_ids(prompt, 70, params, use_cache=False)) == expected


@pytest.mark.parametrize("params", PARAMS, ids=["greedy", "sampled"])
def test_batch_rows_equal_the_forward_loop(ort: OnnxGPT, params):
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, ort.config.vocab_size, n).tolist() for n in (1, 7, 30)]
    steps = list(ort.generate_batch_ids(prompts, 40, params))
    rows = [list(column) for column in zip(*steps, strict=True)]
    assert rows == [reference_ids(ort, p, 40, params) for p in prompts]


def test_the_cache_passes_from_step_to_step_uncopied(ort: OnnxGPT):
    """Each run is fed the very arrays the previous run returned as ``present.*``."""
    decoder, seen = _Decoder(ort, 2), []
    run = decoder._run

    def recording_run(outputs, feeds):
        result = run(outputs, feeds)
        seen.append(([feeds[n] for i in range(ort.config.n_layer) for n in sig.past_names(i)],
                     result[1:]))  # fmt: skip
        return result

    decoder._run = recording_run
    ids, mask = padded([[1, 2, 3], [4]])
    decoder.start(ids, mask)
    for _ in range(3):
        decoder.extend(np.array([[5], [6]]))
    for (_, present), (fed, _) in zip(seen, seen[1:]):  # noqa: B905
        assert all(a is b for a, b in zip(present, fed, strict=True))


def test_greedy_batch_step_is_sample_next_of_every_row():
    logits = np.array([[0.0, 2.0, 2.0, 1.0], [3.0, -1.0, 3.0, 0.5]], np.float32)  # ties
    rngs = [np.random.default_rng(0) for _ in logits]
    greedy = SamplingParams(temperature=0.0)
    assert next_tokens(logits, greedy, rngs) == [1, 0]  # the lowest id among ties
    assert next_tokens(logits, greedy, rngs) == [
        sampling.sample_next(row, greedy, rng) for row, rng in zip(logits, rngs, strict=True)
    ]
    logits[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        next_tokens(logits, greedy, rngs)


def test_public_cached_step_still_checks_its_ids(ort: OnnxGPT):
    step = ort.cached_step()
    vocab, block = ort.config.vocab_size, ort.config.block_size
    with pytest.raises(InputError, match="out of range"):
        step([1, vocab], 0)
    step([1] * block, 0)
    with pytest.raises(InputError, match="exceeds the context window"):
        step([2], block)
    logits = ort.cached_step()([1, 2, 3], 0)
    np.testing.assert_allclose(logits, ort.forward([[1, 2, 3]])[0][0, -1], atol=1e-5, rtol=0)


def test_unchecked_run_falls_back_to_the_public_run():
    class Session:  # no C++ session behind it
        def run(self, outputs, feeds):
            return ["public", outputs, feeds]

    assert unchecked_run(Session())(["logits"], {}) == ["public", ["logits"], {}]


# -- a graph whose KV cache is float16 -------------------------------------------------------
def float16_cache(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with float16 ``past_key_values.*`` inputs and ``present.*`` outputs.

    The graph computes in float32 as before: a Cast follows each past input and precedes
    each present output (what a float16 export looks like from outside).
    """
    graph = model.graph
    casts = []
    for value in graph.input:
        if value.name.startswith("past_key_values."):
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
            inner = value.name + ".float32"
            for node in graph.node:
                node.input[:] = [inner if n == value.name else n for n in node.input]
            casts.append(helper.make_node("Cast", [value.name], [inner], to=TensorProto.FLOAT))
    for value in graph.output:
        if value.name.startswith("present."):
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
            inner = value.name + ".float32"
            for node in graph.node:  # the producer and any consumer inside the graph
                node.output[:] = [inner if n == value.name else n for n in node.output]
                node.input[:] = [inner if n == value.name else n for n in node.input]
            casts.append(helper.make_node("Cast", [inner], [value.name], to=TensorProto.FLOAT16))
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts[: len(casts) // 2] + nodes + casts[len(casts) // 2 :])
    return model


@pytest.fixture(scope="module")
def half_cache(exported: Path, tmp_path_factory) -> OnnxGPT:
    folder = shutil.copytree(exported, tmp_path_factory.mktemp("half") / "folder")
    onnx.save(float16_cache(onnx.load(folder / MODEL_FILE)), folder / MODEL_FILE)
    return OnnxGPT.load(folder)


def test_float16_cache_is_read_from_the_session(half_cache: OnnxGPT):
    assert half_cache.past_dtype == np.float16
    assert all(k.dtype == v.dtype == np.float16 for k, v in half_cache.empty_past(2))
    _, past = half_cache.forward([[1, 2, 3]])
    assert past[0][0].dtype == np.float16
    as_float32 = [(k.astype(np.float32), v.astype(np.float32)) for k, v in past]
    with pytest.raises(InputError, match=r"past\[0\] key is float32, not float16"):
        half_cache.forward([[4]], past=as_float32)


@pytest.mark.parametrize("params", PARAMS, ids=["greedy", "sampled"])
def test_float16_cache_fast_path_equals_forward(half_cache: OnnxGPT, params):
    prompts = [[1, 2, 3, 4], [5]]
    assert list(half_cache.generate_ids(prompts[0], 50, params)) == reference_ids(
        half_cache, prompts[0], 50, params
    )
    rows = [list(c) for c in zip(*half_cache.generate_batch_ids(prompts, 20, params), strict=True)]
    assert rows == [reference_ids(half_cache, p, 20, params) for p in prompts]
