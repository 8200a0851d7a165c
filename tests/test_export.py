"""The exporter: folder contents, graph structure and metadata, bad input, atomic writes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from safetensors.numpy import save_file
from test_export_support import CONFIGS, random_weights, write_random_checkpoint

import mlxgpt
from mlxgpt.checkpoint import CheckpointError, expected_shapes
from mlxgpt.cli import main as mlxgpt_main
from mlxgpt.tokenizer import Tokenizer
from mlxgpt_export import exporter
from mlxgpt_export import signature as sig
from mlxgpt_export.errors import ExportError
from mlxgpt_export.exporter import EXPORT_ENTRIES, export_checkpoint
from mlxgpt_export.runtime import MODEL_FILE

CONFIG = CONFIGS["bias-4layer-hs7-gelutanh"]
FILES = set(EXPORT_ENTRIES)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt", CONFIG)


@pytest.fixture(scope="module", params=["portable", "fused"])
def exported(request, ckpt: Path, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("export") / request.param
    export_checkpoint(ckpt, out, attention=request.param, quiet=True)
    return request.param, out


def test_folder_contents(exported, ckpt: Path):
    _, out = exported
    assert {p.name for p in out.iterdir()} == FILES
    assert [p.name for p in (out / "onnx").iterdir()] == ["model.onnx"]  # weights stored once
    config = json.loads((out / "config.json").read_text())
    assert config["mlxgpt"] == dataclasses.asdict(CONFIG)
    assert config["model_type"] == "gpt2" and config["activation_function"] == "gelu_new"
    assert (config["n_layer"], config["n_head"], config["n_embd"]) == (4, 2, 14)
    assert (config["vocab_size"], config["n_positions"]) == (CONFIG.vocab_size, CONFIG.block_size)
    # the tokenizer is rewritten in the form every client reads, with the same ids
    original = Tokenizer.load(ckpt / "tokenizer.json")
    written = Tokenizer.load(out / "tokenizer.json")
    text = "".join(written.vocab) * 3
    assert written.encode(text) == original.encode(text)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["bos_token_id"] == original.start_id == config["bos_token_id"]
    assert generation["eos_token_id"] is None is config["eos_token_id"]  # a char model
    assert generation["context_length"] == CONFIG.block_size
    # Hugging Face keys with their Hugging Face meaning: greedy (no sampling keys, which
    # transformers would ignore with a warning), 200 new tokens
    assert (generation["do_sample"], generation["max_new_tokens"]) == (False, 200)
    assert not {"temperature", "top_k", "top_p"} & set(generation)


def test_model_passes_the_full_checker_with_the_right_opset(exported):
    form, out = exported
    model = onnx.load(str(out / MODEL_FILE))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == {"portable": 17, "fused": 23}[form]
    ops = {node.op_type for node in model.graph.node}
    assert ("Attention" in ops) == (form == "fused")
    assert ("Softmax" in ops) == (form == "portable")


def test_inputs_outputs_have_standard_names_and_symbolic_dims(exported):
    _, out = exported
    graph = onnx.load(str(out / MODEL_FILE)).graph

    def dims(value: onnx.ValueInfoProto) -> list[str | int]:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    H, hs = CONFIG.n_head, CONFIG.head_size
    inputs = {v.name: dims(v) for v in graph.input}
    outputs = {v.name: dims(v) for v in graph.output}
    assert list(inputs) == sig.input_names(CONFIG.n_layer)
    assert list(outputs) == sig.output_names(CONFIG.n_layer)
    assert inputs["input_ids"] == ["batch_size", "sequence_length"]
    assert inputs["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert inputs["position_ids"] == ["batch_size", "sequence_length"]
    assert inputs["past_key_values.3.value"] == ["batch_size", H, "past_sequence_length", hs]
    assert outputs["logits"] == ["batch_size", "sequence_length", CONFIG.vocab_size]
    assert outputs["present.0.key"] == ["batch_size", H, "total_sequence_length", hs]


def test_tied_embedding_is_stored_once(exported):
    _, out = exported
    model = onnx.load(str(out / MODEL_FILE))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    vocab_sized = [name for name, a in inits.items() if CONFIG.vocab_size in a.shape]
    assert vocab_sized == ["wte.weight"]
    stored = sum(a.size for a in inits.values() if a.dtype == np.float32 and a.size > 3)
    assert stored == sum(int(np.prod(s)) for s in expected_shapes(CONFIG).values())


def test_metadata_records_version_config_and_parity(exported):
    form, out = exported
    meta = {p.key: p.value for p in onnx.load(str(out / MODEL_FILE)).metadata_props}
    assert meta["mlxgpt_version"] == mlxgpt.__version__
    assert json.loads(meta["model_config"]) == dataclasses.asdict(CONFIG)
    assert meta["attention"] == form
    parity = json.loads(meta["parity"])
    assert parity["measured"] and parity["passed"] and parity["fully_padded_row_finite"]
    for key in ("prompt", "decode_step", "chunk_after_past", "left_padded_batch"):
        assert 0 <= parity[key] < 1e-4


def test_no_verify_records_that_parity_was_not_measured(ckpt: Path, tmp_path: Path):
    export_checkpoint(ckpt, tmp_path / "out", verify=False, quiet=True)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "out" / MODEL_FILE)).metadata_props}
    assert json.loads(meta["parity"]) == {"measured": False}


def test_training_out_dir_is_accepted(ckpt: Path, tmp_path: Path, capsys):
    """A training run's out_dir works as well as its ckpt/ folder, and a summary is printed."""
    export_checkpoint(ckpt.parent, tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == FILES
    assert "parity vs numpy reference" in capsys.readouterr().out


# -- bad input ------------------------------------------------------------------------------
def test_missing_checkpoint(tmp_path: Path):
    with pytest.raises(CheckpointError, match="does not exist"):
        export_checkpoint(tmp_path / "nope", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupt_weights(ckpt: Path, tmp_path: Path):
    bad = write_random_checkpoint(tmp_path / "bad", CONFIG)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        export_checkpoint(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"n_kv_head": 2}, "unknown config key.*n_kv_head"),
        ({"n_head": 5}, "divisible"),
        ({"vocab_size": 99}, "config.json implies"),
    ],
)
def test_unsupported_or_inconsistent_config(tmp_path: Path, change: dict, message: str):
    bad = write_random_checkpoint(tmp_path / "bad", CONFIG)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=message):
        export_checkpoint(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tokenizer_that_does_not_fit_the_model(tmp_path: Path):
    bad = write_random_checkpoint(tmp_path / "bad", CONFIG)
    Tokenizer.train_char(["abc"]).save(bad / "tokenizer.json")
    with pytest.raises(CheckpointError, match="tokenizer has 3 tokens"):
        export_checkpoint(bad, tmp_path / "out")


def test_unknown_attention_form(ckpt: Path, tmp_path: Path):
    with pytest.raises(ExportError, match="portable, fused"):
        export_checkpoint(ckpt, tmp_path / "out", attention="flash")
    assert not (tmp_path / "out").exists()


def test_existing_folder_is_refused_unless_force(ckpt: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists: pass --force"):
        export_checkpoint(ckpt, out, quiet=True)
    with pytest.raises(ExportError, match="not an mlxgpt export folder"):  # not ours
        export_checkpoint(ckpt, out, force=True, quiet=True)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    export_checkpoint(ckpt, out, force=True, quiet=True)  # an empty folder is replaced
    assert {p.name for p in out.iterdir()} == FILES


def test_refuses_to_overwrite_the_checkpoint_itself(ckpt: Path):
    for target in (ckpt, ckpt.parent):
        with pytest.raises(ExportError, match="would replace the checkpoint"):
            export_checkpoint(ckpt, target, force=True)
    assert (ckpt / "model.safetensors").is_file()


@pytest.mark.parametrize("existing", [False, True])
def test_failed_export_leaves_nothing_behind(ckpt: Path, tmp_path: Path, monkeypatch, existing):
    """A failure after model.onnx was written: no new folder, no temp folder, old one intact."""
    out = tmp_path / "out"
    if existing:
        export_checkpoint(ckpt, out, quiet=True)
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(exporter, "generation_config", boom)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(ckpt, out, force=True, quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if existing else [])
    if existing:
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_failed_parity_check_writes_nothing(ckpt: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr("mlxgpt_export.parity.TOLERANCE", -1.0)
    with pytest.raises(ExportError, match="parity check failed"):
        export_checkpoint(ckpt, tmp_path / "out", quiet=True)
    assert list(tmp_path.iterdir()) == []


# -- the `mlxgpt export` command ------------------------------------------------------------
def test_cli_export(ckpt: Path, tmp_path: Path, capsys):
    out = str(tmp_path / "out")
    assert mlxgpt_main(["export", str(ckpt), out, "--attention", "fused"]) == 0
    assert "fused attention, opset 23" in capsys.readouterr().out
    assert mlxgpt_main(["export", str(ckpt), out]) == 2
    assert "already exists: pass --force" in capsys.readouterr().err
    assert mlxgpt_main(["export", str(ckpt), out, "--force", "--no-verify"]) == 0
    assert mlxgpt_main(["export", str(tmp_path / "missing"), str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and "Traceback" not in err


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_special_tokens_in_the_client_files(tmp_path: Path, kind: str):
    """bos = start token; eos/pad = <|endoftext|> for BPE, none for char (genai: see below)."""
    text = "First Citizen:\nSpeak, speak.\n" * 20
    if kind == "bpe":
        tokenizer = Tokenizer.train_bpe([text], vocab_size=300)
    else:
        tokenizer = Tokenizer.train_char([text])
    config = dataclasses.replace(CONFIG, vocab_size=tokenizer.vocab_size)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file(random_weights(config), str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    tokenizer.save(ckpt / "tokenizer.json")
    out = export_checkpoint(ckpt, tmp_path / "out", verify=False, quiet=True)
    files = {name: json.loads((out / name).read_text()) for name in EXPORT_ENTRIES[1:]}
    eos = tokenizer.eos_id
    for name in ("config.json", "generation_config.json"):
        ids = [files[name][f"{t}_token_id"] for t in ("bos", "eos", "pad")]
        assert ids == [tokenizer.start_id, eos, eos]
    tokens = files["tokenizer_config.json"]
    eot = "<|endoftext|>" if kind == "bpe" else None
    assert [tokens[f"{t}_token"] for t in ("bos", "eos", "pad")] == [eot] * 3
    assert tokens["padding_side"] == "left" and not tokens["add_bos_token"]
    assert files["special_tokens_map.json"] == (
        {} if eot is None else dict.fromkeys(("bos_token", "eos_token", "pad_token"), eot)
    )
    genai = files["genai_config.json"]["model"]
    # genai insists on an end token in the vocabulary: a char model gets its highest id
    stop = eos if kind == "bpe" else tokenizer.vocab_size - 1
    assert (genai["eos_token_id"], genai["pad_token_id"], genai["bos_token_id"]) == (
        stop,
        stop,
        tokenizer.start_id,
    )
    assert genai["decoder"]["filename"] == MODEL_FILE
    assert files["genai_config.json"]["search"]["past_present_share_buffer"] is False
