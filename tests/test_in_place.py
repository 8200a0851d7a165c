"""Generation's in-place KV cache (mlxgpt_export.in_place and the runtime's _InPlaceDecoder).

The rewritten graph must compute what the exported one computes (identical tokens greedy
and sampled, alone, batched and across the window slide; its logits are held to
``forward()`` in tests/test_runtime_fast.py and to the reference in
tests/test_export_precision.py), must keep every node outside attention, and the decoder
must really keep the cache in its own buffers, written where each row's tokens are. Where
no in-place graph can be made (no ``onnx``, heads onnxruntime's operator refuses, a foreign
graph, ``in_place`` off, a graph that disagrees with the exported one), generation decodes
on the exported graph and gives the same tokens.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_export_support import CONFIGS, write_random_checkpoint
from test_runtime_fast import PARAMS, padded, reference_ids

from mlxgpt.checkpoint import read_config, read_weights
from mlxgpt.config import GPTConfig
from mlxgpt_export import signature as sig
from mlxgpt_export.exporter import export_checkpoint
from mlxgpt_export.in_place import (
    SEQLENS_K,
    TOTAL_LENGTH,
    RewriteError,
    in_place_model,
    write_in_place_model,
)
from mlxgpt_export.parity import reference_logits
from mlxgpt_export.runtime import OnnxGPT, _Decoder, _InPlaceDecoder


def op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def test_rewrite_replaces_attention_and_gelu_and_keeps_every_other_value(ort: OnnxGPT):
    exported = onnx.load(str(ort.model_path))
    rewritten = in_place_model(onnx.load(str(ort.model_path)), ort.config)
    onnx.checker.check_model(rewritten)
    kinds = op_types(rewritten)
    n_layer = ort.config.n_layer
    assert kinds.count("GroupQueryAttention") == kinds.count("Gelu") == n_layer
    for gone in ("Concat", "Attention", "Softmax", "Split", "Erf"):
        assert gone not in kinds
    inputs = [i.name for i in rewritten.graph.input]
    assert sig.ATTENTION_MASK not in inputs and inputs[-2:] == [SEQLENS_K, TOTAL_LENGTH]
    made = {name for n in rewritten.graph.node for name in n.output}
    scopes = (
        "/mask/",
        *(f"/h.{i}/{part}/" for i in range(n_layer) for part in ("attn", "mlp/gelu")),
    )
    outside = [
        name
        for n in exported.graph.node
        if not any(o.startswith(scopes) or o.startswith("present.") for o in n.output)
        for name in n.output
    ]
    assert outside and set(outside) <= made  # residual sums, LayerNorms, MatMuls, head...
    weights = {t.name for t in exported.graph.initializer if t.name.endswith("weight_t")}
    assert weights <= {t.name for t in rewritten.graph.initializer}


def test_tanh_gelu_becomes_fast_gelu_within_1e5_of_the_reference(tmp_path: Path):
    """The tanh approximation (GPT-2's) fuses into FastGelu; logits of a padded batch and of
    decode steps stay within 1e-5 (of the largest |logit|) of the float64 reference."""
    config = GPTConfig(
        vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=32, activation="gelu_tanh"
    )
    ckpt = write_random_checkpoint(tmp_path / "ckpt", config, seed=4)
    model = OnnxGPT.load(export_checkpoint(ckpt, tmp_path / "out", quiet=True))
    rewritten = in_place_model(onnx.load(str(model.model_path)), model.config)
    assert op_types(rewritten).count("FastGelu") == 2 and "Tanh" not in op_types(rewritten)
    weights = read_weights(ckpt, read_config(ckpt))
    rows = [[3, 1, 4, 1, 5], [9, 2]]
    ids, mask = padded(rows)
    decoder = _InPlaceDecoder(model, 2, model.in_place_session())
    logits = decoder.start(ids, mask)
    for token in (6, 7, 0):
        expected = [reference_logits(weights, config, np.array([r]))[0, -1] for r in rows]
        scale = max(1.0, float(np.abs(expected).max()))
        assert np.abs(logits - np.array(expected)).max() <= 1e-5 * scale
        rows = [r + [token] for r in rows]
        logits = decoder.extend(np.array([[token], [token]]))


def test_float16_export_decodes_in_float32_on_its_own_weights(tmp_path: Path, capsys):
    """A float16 export's in-place graph computes in float32 (no float16 tensor, cast or
    cache left), on weights equal to the export's float16 values, and stays within float16's
    bound of the float64 reference while decoding a padded batch; ``info`` says so."""
    from mlxgpt_export.cli import WIDENED
    from mlxgpt_export.cli import main as ort_main

    config = CONFIGS["bias-1layer-hs8"]
    ckpt = write_random_checkpoint(tmp_path / "ckpt", config, seed=5)
    model = OnnxGPT.load(export_checkpoint(ckpt, tmp_path / "out", quiet=True, dtype="float16"))
    exported = onnx.load(str(model.model_path))
    rewritten = in_place_model(onnx.load(str(model.model_path)), model.config)
    onnx.checker.check_model(rewritten)
    half = onnx.TensorProto.FLOAT16
    graph = rewritten.graph
    values = [*graph.input, *graph.output, *graph.value_info]
    assert not [v.name for v in values if v.type.tensor_type.elem_type == half]
    assert not [t.name for t in graph.initializer if t.data_type == half]
    casts = [a.i for n in graph.node if n.op_type == "Cast" for a in n.attribute]
    assert half not in casts
    wide = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    for tensor in exported.graph.initializer:
        if tensor.data_type == half and tensor.name in wide:
            expected = onnx.numpy_helper.to_array(tensor).astype(np.float32)
            np.testing.assert_array_equal(wide[tensor.name], expected)
    decoder = _InPlaceDecoder(model, 2, model.in_place_session())
    assert {b.dtype for b in decoder._buffers} == {np.dtype(np.float32)}
    weights = read_weights(ckpt, read_config(ckpt))
    rows = [[3, 1, 4, 1, 5], [9, 2]]
    logits = decoder.start(*padded(rows))
    for token in (6, 7):
        expected = [reference_logits(weights, config, np.array([r]))[0, -1] for r in rows]
        scale = max(1.0, float(np.abs(expected).max()))
        assert np.abs(logits - np.array(expected)).max() <= 2e-3 * scale
        rows = [r + [token] for r in rows]
        logits = decoder.extend(np.array([[token], [token]]))
    assert ort_main(["info", str(tmp_path / "out")]) == 0
    assert WIDENED in capsys.readouterr().out


def test_one_row_alternates_steps_and_chunks(ort: OnnxGPT):
    """At batch 1 a chunk runs in one call after a past and the next step binds its own
    inputs again: steps, a three-token chunk, steps, all within 1e-5 of forward()."""
    decoder = _InPlaceDecoder(ort, 1, ort.in_place_session())
    ids = np.array([[4, 2, 9]])
    logits, past = ort.forward(ids)
    np.testing.assert_allclose(decoder.start(ids, np.ones_like(ids)), logits[:, -1], atol=1e-5)
    for chunk in ([[1]], [[3]], [[5, 6, 7]], [[8]], [[2]]):
        logits, past = ort.forward(chunk, past=past)
        np.testing.assert_allclose(decoder.extend(np.array(chunk)), logits[:, -1], atol=1e-5)
    assert decoder.length == 3 + 7


def test_the_cache_lives_in_the_decoders_buffers(ort: OnnxGPT):
    """After a padded prompt and three steps, row r's keys and values are the first
    ``length_r`` positions of the decoder's own buffers (right-aligned in forward()'s
    left-padded present), and the buffers are the ones bound at the start."""
    prompts = [[1, 2, 3, 4], [5]]
    ids, mask = padded(prompts)
    decoder = _InPlaceDecoder(ort, 2, ort.in_place_session())
    buffers = [b.ctypes.data for b in decoder._buffers]
    decoder.start(ids, mask)
    _, past = ort.forward(ids, mask)
    for token in ([6], [7], [8]):
        step = np.array([token, token])
        decoder.extend(step)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        _, past = ort.forward(step, mask, past=past)
    assert [b.ctypes.data for b in decoder._buffers] == buffers
    present = [x for kv in past for x in kv]
    for row, prompt in enumerate(prompts):
        length = len(prompt) + 3
        for buffer, expected in zip(decoder._buffers, present, strict=True):
            np.testing.assert_allclose(
                buffer[row, :, :length], expected[row, :, -length:], atol=1e-5, rtol=0
            )


@pytest.mark.parametrize("params", PARAMS, ids=["greedy", "sampled"])
def test_generation_decodes_in_place_and_equals_the_forward_loop(ort: OnnxGPT, params):
    """70 tokens after a 20-token prompt in a 32-token window (it slides), and a batch."""
    assert isinstance(ort._decoder(1), _InPlaceDecoder)
    prompt = np.random.default_rng(1).integers(0, ort.config.vocab_size, 20).tolist()
    assert list(ort.generate_ids(prompt, 70, params)) == reference_ids(ort, prompt, 70, params)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, ort.config.vocab_size, n).tolist() for n in (1, 7, 30)]
    rows = [list(c) for c in zip(*ort.generate_batch_ids(prompts, 40, params), strict=True)]
    assert rows == [reference_ids(ort, p, 40, params) for p in prompts]


# -- where there is no in-place graph --------------------------------------------------------
def test_in_place_off_decodes_on_the_exported_graph(exported: Path):
    model = OnnxGPT.load(exported)
    model.in_place = False
    assert model.in_place_session() is None and isinstance(model._decoder(2), _Decoder)
    prompt = [3, 1, 4, 1, 5]
    greedy = PARAMS[0]
    assert list(model.generate_ids(prompt, 20, greedy)) == reference_ids(model, prompt, 20, greedy)


def test_without_onnx_there_is_no_in_place_graph(exported: Path, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    model = OnnxGPT.load(exported)
    assert not write_in_place_model(model.model_path, model.config, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    assert model.in_place_session() is None
    assert len(list(model.generate_ids([1, 2, 3], 5, PARAMS[0]))) == 5


def test_heads_the_operator_refuses_keep_the_exported_graph(tmp_path: Path):
    ckpt = write_random_checkpoint(tmp_path / "ckpt", CONFIGS["nobias-2layer-hs5"], seed=1)
    model = OnnxGPT.load(export_checkpoint(ckpt, tmp_path / "out", quiet=True))
    with pytest.raises(RewriteError, match="head size 5 is not a multiple of 8"):
        in_place_model(onnx.load(str(model.model_path)), model.config)
    assert model.in_place_session() is None
    greedy = PARAMS[0]
    assert list(model.generate_ids([1, 2], 10, greedy)) == reference_ids(model, [1, 2], 10, greedy)


def test_a_graph_without_mlxgpt_attention_is_not_rewritten(ort: OnnxGPT):
    model = onnx.load(str(ort.model_path))
    for node in model.graph.node:  # a foreign exporter's names
        node.output[:] = [o.replace("/attn/y", "/attn/out") for o in node.output]
        node.input[:] = [i.replace("/attn/y", "/attn/out") for i in node.input]
    with pytest.raises(RewriteError, match="/attn/y"):
        in_place_model(model, ort.config)


def test_released_model_has_no_in_place_session(exported: Path):
    model = OnnxGPT.load(exported)
    assert model.in_place_session() is not None
    model.release_session()
    assert model.in_place_session() is None


def test_cli_no_in_place_gives_the_same_text_and_info_says_how_it_decodes(exported: Path, capsys):
    from mlxgpt_export.cli import EXPORTED_GRAPH, IN_PLACE
    from mlxgpt_export.cli import main as ort_main

    texts = []
    for flags in ([], ["--no-in-place"]):
        argv = ["generate", str(exported), "--prompt", "the ", "--max-tokens", "30"]
        assert ort_main([*argv, "--temperature", "0", *flags]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and len(texts[0]) > len("the \n")
    assert ort_main(["info", str(exported)]) == 0
    assert f"generation decodes: {IN_PLACE}" in capsys.readouterr().out
    assert EXPORTED_GRAPH != IN_PLACE


def test_an_in_place_graph_that_disagrees_with_the_export_is_not_used(exported: Path, monkeypatch):
    """OnnxGPT checks the in-place graph against the exported one once (a padded batch and a
    step) and keeps the exported graph if they differ: here, attention scaled wrongly."""
    import mlxgpt_export.runtime as runtime

    def wrong_scale(model_path: Path, config, out: Path) -> bool:
        model = in_place_model(onnx.load(str(model_path)), config)
        for node in model.graph.node:
            for attribute in node.attribute:
                if attribute.name == "scale":
                    attribute.f *= 1.5
        onnx.save(model, str(out))
        return True

    model = OnnxGPT.load(exported)
    monkeypatch.setattr(runtime, "write_in_place_model", wrong_scale)
    assert model.in_place_session() is None and isinstance(model._decoder(1), _Decoder)
    greedy = PARAMS[0]
    assert list(model.generate_ids([1, 2], 10, greedy)) == reference_ids(model, [1, 2], 10, greedy)
