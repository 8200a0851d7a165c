"""float16 and int8 exports, and weights written as ONNX external data.

Each precision is measured against the numpy float64 reference of the checkpoint's own
float32 weights (the model as trained), for random tiny configs and a briefly trained
checkpoint, in both attention forms. The bounds are relative to the largest |logit| of
the reference (at least 1), as the export's own check is (mlxgpt_export.parity).
"""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from safetensors.numpy import load_file, save_file
from test_export_support import CONFIGS, write_random_checkpoint

from mlxgpt.checkpoint import read_config, read_weights, resolve
from mlxgpt.cli import main as mlxgpt_main
from mlxgpt_export import signature as sig
from mlxgpt_export.cli import main as ort_main
from mlxgpt_export.errors import ExportError, InputError
from mlxgpt_export.exporter import export_checkpoint
from mlxgpt_export.graph import HEAD_WEIGHT, MASK_MIN_FLOAT16
from mlxgpt_export.parity import reference_logits
from mlxgpt_export.runtime import MODEL_FILES, OnnxGPT, _InPlaceDecoder

ROOT = Path(__file__).resolve().parents[1]
# Measured (README): float16 <= 1.1e-3 and int8 <= 2.6e-2 of the largest |logit| on every
# model here and on random weights of the shakespeare-char shape.
BOUNDS = {"float16": 2e-3, "int8": 5e-2}
OPTIONS = {"float16": {"dtype": "float16"}, "int8": {"quantize": "int8"}}
MODELS = ["nobias-2layer-hs5", "bias-4layer-hs7-gelutanh", "trained"]
FORMS = ["portable", "fused"]


@pytest.fixture(scope="module", params=MODELS)
def checkpoint(request, tmp_path_factory) -> Path:
    if request.param == "trained":
        return resolve(request.getfixturevalue("trained_ckpt"))
    directory = tmp_path_factory.mktemp(request.param) / "ckpt"
    return write_random_checkpoint(directory, CONFIGS[request.param], seed=3)


@pytest.fixture(scope="module", params=[(p, f) for p in BOUNDS for f in FORMS], ids="-".join)
def case(request, checkpoint: Path, tmp_path_factory):
    """(precision, form, folder, model, float32 weights) of one export."""
    precision, form = request.param
    out = tmp_path_factory.mktemp("export") / f"{precision}-{form}"
    export_checkpoint(checkpoint, out, attention=form, quiet=True, **OPTIONS[precision])
    weights = read_weights(checkpoint, read_config(checkpoint))
    return precision, form, out, OnnxGPT.load(out), weights


def within_bound(precision: str, logits: np.ndarray, expected: np.ndarray) -> None:
    bound = BOUNDS[precision] * max(1.0, float(np.abs(expected).max()))
    diff = float(np.abs(logits.astype(np.float64) - expected).max())
    assert diff <= bound, f"{precision}: max |logit difference| {diff:.3g} > {bound:.3g}"


# -- logits ---------------------------------------------------------------------------------
def test_prompt_decode_and_chunk_logits_within_the_bound(case):
    precision, _, _, model, weights = case
    T = model.config.block_size
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, T))
    expected = reference_logits(weights, model.config, ids)
    logits, _ = model.forward(ids)
    within_bound(precision, logits, expected)
    _, past = model.forward(ids[:, :-1])
    step, _ = model.forward(ids[:, -1:], past=past)  # a decode step on the model's own cache
    within_bound(precision, step[:, -1], expected[:, -1])
    _, past = model.forward(ids[:, : T // 2])
    chunk, _ = model.forward(ids[:, T // 2 :], past=past)
    within_bound(precision, chunk, expected[:, T // 2 :])


def test_left_padded_batch_and_a_fully_padded_row(case):
    """Padding is masked in every precision; a row of padding only gives no NaN or inf."""
    precision, _, _, model, weights = case
    T, pad = 10, 4
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, (3, T))
    mask = np.ones((3, T), np.int64)
    mask[1, :pad] = 0
    mask[2] = 0
    logits, present = model.forward(ids, mask)
    within_bound(precision, logits[0], reference_logits(weights, model.config, ids[:1])[0])
    alone = reference_logits(weights, model.config, ids[1:2, pad:])[0]
    within_bound(precision, logits[1, pad:], alone)
    assert all(np.isfinite(t).all() for t in [logits, *(x for kv in present for x in kv)])
    assert all(x.dtype == model.past_dtype for kv in present for x in kv)


def test_parity_figures_and_precision_in_the_metadata(case):
    precision, form, out, _, _ = case
    model = onnx.load(str(out / MODEL_FILES[precision]))
    meta = {p.key: p.value for p in model.metadata_props}
    assert (meta["dtype"], meta["quantization"], meta["attention"]) == {
        "float16": ("float16", "none", form),
        "int8": ("float32", "int8", form),
    }[precision]
    parity = json.loads(meta["parity"])
    assert parity["passed"] and parity["precision"] == precision
    bound = BOUNDS[precision] * max(1.0, parity["max_abs_logit"])
    assert 0 < parity["max_abs_diff"] <= bound < parity["tolerance"]  # lossy, within the tests'


def test_folder_names_the_file_of_its_precision_for_every_client(case):
    precision, _, out, _, _ = case
    assert [p.name for p in (out / "onnx").iterdir()] == [Path(MODEL_FILES[precision]).name]
    config = json.loads((out / "config.json").read_text())
    assert config["transformers.js_config"] == {
        "dtype": {"float16": "fp16", "int8": "q8"}[precision]
    }
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["filename"] == MODEL_FILES[precision]


# -- float16: what stays float32 ------------------------------------------------------------
@pytest.mark.parametrize("form", FORMS)
def test_float16_graph_types(form: str, tmp_path: Path):
    ckpt = write_random_checkpoint(tmp_path / "ckpt", CONFIGS["nobias-2layer-hs5"])
    out = export_checkpoint(ckpt, tmp_path / "out", attention=form, dtype="float16", quiet=True)
    model = onnx.load(str(out / MODEL_FILES["float16"]))
    graph = model.graph
    io = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}
    F16, F32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    assert io[sig.LOGITS] == F32  # clients sample from float32 logits
    kv = [*sig.past_names(0), *sig.present_names(1)]
    assert {io[name] for name in kv} == {F16}
    inits = {t.name: t for t in graph.initializer}
    assert inits["h.0.attn.c_attn.weight_t"].data_type == F16
    assert inits["wte.weight"].data_type == F16 and inits["h.1.ln_2.weight"].data_type == F16
    nodes = {n.name: n for n in graph.node}
    norms = [n for n in graph.node if n.op_type == "LayerNormalization"]
    assert norms and all(onnx.helper.get_node_attr_value(n, "stash_type") == F32 for n in norms)
    mask_min = onnx.numpy_helper.to_array(inits["/mask/min_f"])
    if form == "portable":  # scores cast up, mask and softmax in float32, probabilities down
        assert mask_min.dtype == np.float32 and mask_min == np.finfo(np.float32).min
        assert nodes["/h.0/attn/masked_scores"].input[0] == "/h.0/attn/scores_f32"
        assert nodes["/h.0/attn/y_heads"].input[0] == "/h.0/attn/probs_f16"
    else:  # the operator takes a float16 mask: half float16's minimum, softmax in float32
        assert mask_min.dtype == np.float16 and mask_min == MASK_MIN_FLOAT16 == -32752
        attention = nodes["/h.0/attn/y"]
        assert onnx.helper.get_node_attr_value(attention, "softmax_precision") == F32


def test_float16_past_of_the_wrong_type_is_refused(tmp_path: Path):
    ckpt = write_random_checkpoint(tmp_path / "ckpt", CONFIGS["bias-1layer-hs8"])
    model = OnnxGPT.load(export_checkpoint(ckpt, tmp_path / "o", dtype="float16", quiet=True))
    _, past = model.forward([[1, 2, 3]])
    assert past[0][0].dtype == np.float16
    wrong = [(k.astype(np.float32), v.astype(np.float32)) for k, v in past]
    with pytest.raises(InputError, match="float32, not float16"):
        model.forward([[4]], past=wrong)


def test_float16_refuses_weights_beyond_its_range(tmp_path: Path):
    ckpt = write_random_checkpoint(tmp_path / "ckpt", CONFIGS["bias-1layer-hs8"])
    weights = load_file(str(ckpt / "model.safetensors"))
    weights["h.0.mlp.c_fc.weight"][0, 0] = 1e5
    save_file(weights, str(ckpt / "model.safetensors"))
    with pytest.raises(ExportError, match="h.0.mlp.c_fc.weight holds values beyond float16"):
        export_checkpoint(ckpt, tmp_path / "out", dtype="float16", quiet=True)
    assert not (tmp_path / "out").exists()
    export_checkpoint(ckpt, tmp_path / "out", quiet=True)  # float32 takes it


# -- int8: what is quantized ----------------------------------------------------------------
@pytest.mark.parametrize("form", FORMS)
def test_int8_quantizes_every_weight_matmul_and_keeps_embeddings_exact(form: str, tmp_path):
    config = CONFIGS["bias-4layer-hs7-gelutanh"]
    ckpt = write_random_checkpoint(tmp_path / "ckpt", config)
    out = export_checkpoint(ckpt, tmp_path / "out", attention=form, quantize="int8", quiet=True)
    graph = onnx.load(str(out / MODEL_FILES["int8"])).graph
    ops = [n.op_type for n in graph.node]
    # 4 projections per layer and the LM head; q k^T and p v have no weight: float32
    assert ops.count("MatMulInteger") == 4 * config.n_layer + 1
    assert ("Attention" in ops) == (form == "fused")  # the standard operator, untouched
    assert all(n.domain in ("", "ai.onnx") for n in graph.node)  # no contrib operators
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    weights = load_file(str(ckpt / "model.safetensors"))
    for name in ("wte.weight", "wpe.weight"):  # the input Gathers read float32, exactly
        np.testing.assert_array_equal(inits[name], weights[name])
    assert inits[f"{HEAD_WEIGHT}_quantized"].dtype == np.int8
    assert inits["h.0.mlp.c_fc.weight_t_quantized"].dtype == np.int8
    assert not any(name.endswith("weight_t") for name in inits)  # float32 copies dropped


def test_int8_greedy_tokens_agree_with_float32(trained_ckpt: Path, tmp_path: Path):
    """Teacher-forced arg-max over 2 x 64 greedy float32 tokens (scripts/bench_precision.py)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_precision import agreement

    models = {
        name: OnnxGPT.load(export_checkpoint(trained_ckpt, tmp_path / name, quiet=True, **opts))
        for name, opts in (("float32", {}), ("int8", OPTIONS["int8"]))
    }
    prompts = [models["float32"].tokenizer.encode(p) for p in ("First Citizen:\n", "All:")]
    result = agreement(models, prompts, 64)["int8"]
    assert result["agreement"] >= 0.95 and result["max_logit_diff"] > 0


def test_int8_file_is_smaller(tmp_path: Path):
    ckpt = write_random_checkpoint(tmp_path / "ckpt", CONFIGS["nobias-3layer-hs9-gelutanh"])
    sizes = {}
    for precision in ("float32", "float16", "int8"):
        out = export_checkpoint(
            ckpt, tmp_path / precision, quiet=True, **OPTIONS.get(precision, {})
        )
        sizes[precision] = (out / MODEL_FILES[precision]).stat().st_size
    assert sizes["int8"] < 0.5 * sizes["float32"] and sizes["float16"] < 0.6 * sizes["float32"]


# -- external data --------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["float32", "float16", "int8"])
def test_external_data_above_the_threshold(precision: str, tmp_path: Path):
    """Weights in onnx/<file>_data: checked, loaded and run exactly like the single file."""
    ckpt = write_random_checkpoint(tmp_path / "ckpt", CONFIGS["nobias-3layer-hs9-gelutanh"])
    options = OPTIONS.get(precision, {})
    single = export_checkpoint(ckpt, tmp_path / "single", quiet=True, **options)
    out = export_checkpoint(
        ckpt, tmp_path / "ext", quiet=True, external_data_threshold=0, **options
    )
    name = Path(MODEL_FILES[precision]).name
    model_path, data = out / "onnx" / name, out / "onnx" / f"{name}_data"
    assert sorted(p.name for p in (out / "onnx").iterdir()) == [name, f"{name}_data"]
    assert stat.S_IMODE(data.stat().st_mode) == stat.S_IMODE(model_path.stat().st_mode)
    graph = onnx.load(str(model_path), load_external_data=False).graph
    external = {t.name for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    inline = onnx.load(str(single / MODEL_FILES[precision])).graph.initializer
    big = {t.name for t in inline if len(t.raw_data) >= 4096}
    assert big and big <= external  # every weight of some size; tensors under 1 KiB stay:
    assert "/const/heads_shape" not in external  # shapes stay readable by shape inference
    onnx.checker.check_model(str(model_path), full_check=True)
    meta = {
        p.key: p.value for p in onnx.load(str(model_path), load_external_data=False).metadata_props
    }
    assert json.loads(meta["parity"])["passed"]
    config = json.loads((out / "config.json").read_text())
    assert config["transformers.js_config"]["use_external_data_format"] == {name: 1}
    a, b = OnnxGPT.load(out), OnnxGPT.load(single)
    ids = [[3, 1, 4, 1, 5, 9, 2, 6]]
    np.testing.assert_array_equal(a.forward(ids)[0], b.forward(ids)[0])  # the same model


def test_default_threshold_writes_one_file(tmp_path: Path):
    ckpt = write_random_checkpoint(tmp_path / "ckpt", CONFIGS["bias-4layer-hs7-gelutanh"])
    out = export_checkpoint(ckpt, tmp_path / "out", quiet=True, external_data_threshold=10**6)
    assert [p.name for p in (out / "onnx").iterdir()] == ["model.onnx"]
    assert (
        "use_external_data_format"
        not in json.loads((out / "config.json").read_text())["transformers.js_config"]
    )


# -- command lines --------------------------------------------------------------------------
def test_cli_precisions_external_data_and_info(tmp_path: Path, capsys):
    ckpt = write_random_checkpoint(tmp_path / "ckpt", CONFIGS["bias-4layer-hs7-gelutanh"])
    out = tmp_path / "out"
    assert (
        mlxgpt_main(["export", str(ckpt), str(out), "--quantize", "int8", "--external-data"]) == 0
    )
    printed = capsys.readouterr().out
    assert "onnx/model_quantized.onnx + onnx/model_quantized.onnx_data" in printed
    assert "int8" in printed and "external data" in printed
    assert ort_main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "onnx/model_quantized.onnx_data" in info
    assert "precision: int8 (MatMul weights int8" in info
    assert mlxgpt_main(["export", str(ckpt), str(out), "--force", "--dtype", "float16"]) == 0
    capsys.readouterr()
    assert ort_main(["info", str(out)]) == 0
    assert "precision: float16 (weights, activations, past/present" in capsys.readouterr().out
    assert ort_main(["generate", str(out), "--prompt", "ab", "--max-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("ab")


def test_cli_refuses_float16_and_int8_together(tmp_path: Path, capsys):
    ckpt = write_random_checkpoint(tmp_path / "ckpt", CONFIGS["bias-1layer-hs8"])
    args = ["export", str(ckpt), str(tmp_path / "out"), "--dtype", "float16", "--quantize", "int8"]
    assert mlxgpt_main(args) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: --quantize int8 quantizes the float32 graph")
        and err.count("\n") == 1
    )
    assert not (tmp_path / "out").exists()
    with pytest.raises(ExportError, match="--dtype must be one of float32, float16"):
        export_checkpoint(ckpt, tmp_path / "out", dtype="bfloat16")
    with pytest.raises(ExportError, match="--quantize must be one of int8"):
        export_checkpoint(ckpt, tmp_path / "out", quantize="int4")
    assert not (tmp_path / "out").exists()


def test_no_verify_records_the_precision_without_parity(tmp_path: Path):
    ckpt = write_random_checkpoint(tmp_path / "ckpt", CONFIGS["bias-1layer-hs8"])
    out = export_checkpoint(ckpt, tmp_path / "out", verify=False, quiet=True, dtype="float16")
    meta = {p.key: p.value for p in onnx.load(str(out / MODEL_FILES["float16"])).metadata_props}
    assert json.loads(meta["parity"]) == {"measured": False} and meta["dtype"] == "float16"


def test_in_place_decoding_within_the_bound(case):
    """Generation's in-place graph (mlxgpt_export.in_place) holds each precision's bound too:
    a left-padded batch, then single-token steps and a two-token chunk, every row against
    the reference of its own tokens. Heads whose size is not a multiple of 8 have no
    in-place graph (onnxruntime's operator refuses them) and decode on the exported one."""
    precision, _, _, model, weights = case
    session = model.in_place_session()
    if session is None:
        assert model.config.head_size % 8, "an in-place graph was expected"
        return
    rng = np.random.default_rng(2)
    rows = [rng.integers(0, model.config.vocab_size, n).tolist() for n in (6, 1, 11)]
    width = max(map(len, rows))
    ids, mask = np.zeros((3, width), np.int64), np.zeros((3, width), np.int64)
    for r, row in enumerate(rows):
        ids[r, width - len(row) :], mask[r, width - len(row) :] = row, 1
    decoder = _InPlaceDecoder(model, len(rows), session)
    logits = decoder.start(ids, mask)
    for chunk in (1, 1, 2, 0):
        for row, last in zip(rows, logits, strict=True):
            expected = reference_logits(weights, model.config, np.array([row]))[0, -1]
            within_bound(precision, last, expected)
        if chunk:
            new = rng.integers(0, model.config.vocab_size, (len(rows), chunk))
            rows = [row + list(n) for row, n in zip(rows, new.tolist(), strict=True)]
            logits = decoder.extend(new)
