"""The onnxruntime runtime: same text as MLX, batches, streaming, errors, CLI, no MLX at all."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from blocked_imports import blocking_env
from conftest import CORPUS
from test_export_support import mlx_model

from mlxgpt.generate import generate_text, generate_tokens
from mlxgpt.sampling import SamplingParams
from mlxgpt.tokenizer import Tokenizer, TokenizerError, prompt_ids
from mlxgpt_export.cli import main as ort_main
from mlxgpt_export.errors import ExportFolderError, InputError
from mlxgpt_export.exporter import export_checkpoint
from mlxgpt_export.runtime import FOLDER_FILES, MODEL_FILE, OnnxGPT

REPO = Path(__file__).resolve().parents[1]
LONG_PROMPT = CORPUS[:60]  # longer than the trained model's 32-token window


@pytest.fixture(scope="module", params=["portable", "fused"])
def exported(request, trained_ckpt: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ort") / request.param
    export_checkpoint(trained_ckpt, out, attention=request.param, quiet=True)
    return out


@pytest.fixture(scope="module")
def ort(exported: Path) -> OnnxGPT:
    return OnnxGPT.load(exported)


@pytest.fixture(scope="module")
def mlx(trained_ckpt: Path):
    return mlx_model(trained_ckpt)


SETTINGS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.8, seed=1),
    SamplingParams(temperature=1.0, top_k=5, seed=2),
    SamplingParams(temperature=0.9, top_p=0.8, seed=3),
    SamplingParams(temperature=1.3, top_k=10, top_p=0.95, seed=4),
]


def settings_id(p: SamplingParams) -> str:
    return f"t{p.temperature}-k{p.top_k}-p{p.top_p}"


PROMPTS = {"short": "First Citizen:", "empty": "", "long": LONG_PROMPT}


@pytest.mark.parametrize("params", SETTINGS, ids=settings_id)
@pytest.mark.parametrize("prompt", PROMPTS.values(), ids=PROMPTS.keys())
def test_same_text_as_mlx(ort: OnnxGPT, mlx, prompt: str, params: SamplingParams):
    """Same checkpoint, prompt, settings and seed: MLX and onnxruntime write the same text."""
    model, tokenizer = mlx
    expected = "".join(generate_text(model, tokenizer, prompt, 40, params))
    assert "".join(ort.generate(prompt, 40, params)) == expected


def test_generation_streams(ort: OnnxGPT):
    stream = ort.generate("All:", 30, SamplingParams(temperature=0.8, seed=5))
    assert iter(stream) is stream  # an iterator: pieces arrive as they are generated
    first = next(stream)
    pieces = [first, *stream]
    assert len(pieces) > 1
    ids = ort.generate_ids(prompt_ids(ort.tokenizer, "All:"), 30, SamplingParams(0.8, seed=5))
    assert "".join(pieces) == ort.tokenizer.decode(list(ids))


@pytest.mark.parametrize("params", [SETTINGS[0], SETTINGS[4]], ids=settings_id)
def test_left_padded_batch_gives_each_prompts_own_tokens(ort: OnnxGPT, mlx, params):
    """Each row equals that prompt generated alone (ORT and MLX), across the window slide."""
    model, tokenizer = mlx
    prompts = ["First Citizen:", "All:", "Y", "", LONG_PROMPT]
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    steps = list(ort.generate_batch_ids(ids, 40, params))
    rows = [list(col) for col in zip(*steps, strict=True)]
    for row, prompt in zip(rows, ids, strict=True):
        assert row == list(ort.generate_ids(prompt, 40, params))
        assert row == list(generate_tokens(model, prompt, 40, params))
    texts = ort.generate_batch(prompts, 40, params)
    assert texts == [tokenizer.decode(row) for row in rows]


def test_batch_of_identical_prompts_with_a_seed_gives_identical_rows(ort: OnnxGPT):
    texts = ort.generate_batch(["All:", "All:"], 20, SamplingParams(temperature=1.0, seed=9))
    assert texts[0] == texts[1]


def test_exported_defaults_are_greedy_and_200_tokens(ort: OnnxGPT, mlx):
    params, max_tokens = ort.default_settings()
    assert (params.temperature, params.top_k, params.top_p, max_tokens) == (0.0, None, 1.0, 200)
    ids = prompt_ids(ort.tokenizer, "All:")
    greedy = list(generate_tokens(mlx[0], ids, 200, SamplingParams(temperature=0.0)))
    assert list(ort.generate_ids(ids)) == greedy


def test_omitted_flags_come_from_the_folders_generation_config(
    exported: Path, tmp_path: Path, capsys
):
    folder = tmp_path / "edited"
    shutil.copytree(exported, folder)
    path = folder / "generation_config.json"
    edited = {**json.loads(path.read_text()), "do_sample": True, "temperature": 0.7}
    edited.update(top_k=5, top_p=0.9, max_new_tokens=13)
    path.write_text(json.dumps(edited))
    model = OnnxGPT.load(folder)
    assert model.default_settings() == (SamplingParams(0.7, 5, 0.9), 13)
    expected = "".join(model.generate("All:", params=SamplingParams(0.7, 5, 0.9, seed=3)))
    assert len(model.tokenizer.encode(expected)) == 13
    assert ort_main(["generate", str(folder), "--prompt", "All:", "--seed", "3"]) == 0
    assert capsys.readouterr().out == "All:" + expected + "\n"
    # a flag given on the command line wins over the folder
    assert ort_main(["generate", str(folder), "--prompt", "All:", "--max-tokens", "4"]) == 0
    assert len(model.tokenizer.encode(capsys.readouterr().out[4:-1])) == 4


def test_generation_config_keys_missing_take_hugging_face_defaults(exported: Path, tmp_path):
    folder = tmp_path / "sparse"
    shutil.copytree(exported, folder)
    (folder / "generation_config.json").write_text('{"do_sample": true}')
    # transformers' defaults for a sampling config: temperature 1, top_k 50, top_p 1
    assert OnnxGPT.load(folder).default_settings() == (SamplingParams(1.0, 50, 1.0), 200)
    for bad in ('{"do_sample": true, "top_k": "many"}', '{"max_new_tokens": 2.5}'):
        (folder / "generation_config.json").write_text(bad)
        with pytest.raises(ExportFolderError, match="generation_config.json"):
            OnnxGPT.load(folder).default_settings()


# -- errors ---------------------------------------------------------------------------------
def test_token_ids_out_of_range(ort: OnnxGPT):
    vocab = ort.config.vocab_size
    for bad in (vocab, -1):
        with pytest.raises(InputError, match=rf"out of range.*0\.\.{vocab - 1}"):
            ort.forward([[1, bad]])
        with pytest.raises(InputError, match="out of range"):
            list(ort.generate_ids([1, bad], 3))
        with pytest.raises(InputError, match="out of range"):
            list(ort.generate_batch_ids([[1], [bad]], 3))


def test_forward_refuses_sequences_longer_than_the_window(ort: OnnxGPT):
    block = ort.config.block_size
    with pytest.raises(InputError, match=f"{block + 1} tokens exceeds the context window"):
        ort.forward([[1] * (block + 1)])
    _, past = ort.forward([[1] * block])
    with pytest.raises(InputError, match="context window"):
        ort.forward([[1]], past=past)


def test_ragged_batches_are_refused(ort: OnnxGPT):
    with pytest.raises(InputError, match=r"input_ids rows have different lengths \(\[2, 1\]\)"):
        ort.forward([[1, 2], [3]])
    with pytest.raises(InputError, match="attention_mask rows have different lengths"):
        ort.forward([[1, 2], [3, 4]], attention_mask=[[1, 1], [1]])


def test_a_past_that_does_not_fit_the_model_is_refused(ort: OnnxGPT):
    _, past = ort.forward([[1, 2, 3]])
    heads = [(k[:, :1], v[:, :1]) for k, v in past]
    with pytest.raises(InputError, match=r"past\[0\] key has shape .* \(1, 2, past, 16\)"):
        ort.forward([[4]], past=heads)
    doubles = [(k.astype(np.float64), v.astype(np.float64)) for k, v in past]
    with pytest.raises(InputError, match=r"past\[0\] key is float64, not float32"):
        ort.forward([[4]], past=doubles)
    with pytest.raises(InputError, match=r"past\[0\] key has shape"):
        ort.forward([[4], [5]], past=past)  # a past of batch 1 for a batch of 2
    with pytest.raises(InputError, match="past must hold 2 .* got 1 layers"):
        ort.forward([[4]], past=past[:1])
    uneven = [past[0], (past[1][0][:, :, :2], past[1][1][:, :, :2])]
    with pytest.raises(InputError, match=r"different lengths \[2, 3\]"):
        ort.forward([[4]], past=uneven)
    logits, _ = ort.forward([[4]], past=past)  # the past forward() returned still works
    assert logits.shape == (1, 1, ort.config.vocab_size)


def test_position_ids_and_attention_mask_values_are_checked(ort: OnnxGPT):
    with pytest.raises(InputError, match=r"position_ids must be >= 0 .* got -1"):
        ort.forward([[1, 2]], position_ids=[[-1, 0]])
    with pytest.raises(InputError, match="position_ids must hold whole numbers"):
        ort.forward([[1, 2]], position_ids=[[0.0, 1.5]])
    for bad, shown in (([[1, 2]], "[2]"), ([[1, -1]], "[-1]")):
        with pytest.raises(
            InputError, match=rf"only 1 \(a token\) and 0 \(padding\), got {re.escape(shown)}"
        ):
            ort.forward([[1, 2]], attention_mask=bad)
    with pytest.raises(InputError, match="attention_mask must hold whole numbers"):
        ort.forward([[1, 2]], attention_mask=[[1.0, 0.5]])
    with pytest.raises(InputError, match="input_ids must hold whole numbers"):
        ort.forward([[1.0, 2.0]])
    as_bool, _ = ort.forward([[1, 2]], attention_mask=np.array([[False, True]]))
    as_int, _ = ort.forward([[1, 2]], attention_mask=[[0, 1]])
    np.testing.assert_array_equal(as_bool, as_int)


def test_generation_arguments_are_checked_at_the_call(ort: OnnxGPT):
    with pytest.raises(InputError, match="at least one prompt token"):
        ort.generate_ids([])
    with pytest.raises(InputError, match="whole numbers"):
        ort.generate_ids([1.0, 2.5])
    for bad in (2.5, -1, "3"):
        with pytest.raises(InputError, match="max_tokens must be a whole number >= 0"):
            ort.generate_ids([1], bad)
        with pytest.raises(InputError, match="max_tokens must be a whole number >= 0"):
            ort.generate_batch_ids([[1]], bad)
        with pytest.raises(InputError, match="max_tokens"):
            ort.generate("All:", bad)
    with pytest.raises(InputError, match="at least one prompt"):
        ort.generate_batch([])
    with pytest.raises(InputError, match="at least one prompt token"):
        ort.generate_batch_ids([[1], []])


def test_prompt_with_unknown_characters(ort: OnnxGPT):
    with pytest.raises(TokenizerError, match="not in this model's character vocabulary"):
        list(ort.generate("Ω", 3))


@pytest.mark.parametrize("missing", FOLDER_FILES)
def test_missing_file_in_export_folder(exported: Path, tmp_path: Path, missing: str):
    folder = shutil.copytree(exported, tmp_path / "copy")
    (folder / missing).unlink()
    with pytest.raises(ExportFolderError, match=f"incomplete: missing {missing}"):
        OnnxGPT.load(folder)


def test_missing_or_corrupt_export_folder(exported: Path, tmp_path: Path):
    with pytest.raises(ExportFolderError, match="does not exist.*mlxgpt export"):
        OnnxGPT.load(tmp_path / "nope")
    folder = shutil.copytree(exported, tmp_path / "copy")
    (folder / MODEL_FILE).write_bytes(b"not a model")
    with pytest.raises(ExportFolderError, match="model.onnx cannot be loaded"):
        OnnxGPT.load(folder)


def _edit_config(exported: Path, folder: Path, edit) -> Path:
    shutil.copytree(exported, folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_config_edited_after_export_is_refused(exported: Path, tmp_path: Path):
    """The ONNX metadata records the config; an edited config.json names what differs."""

    def n_head_4_everywhere(config: dict) -> None:
        config["n_head"] = config["mlxgpt"]["n_head"] = 4

    folder = _edit_config(exported, tmp_path / "a", n_head_4_everywhere)
    with pytest.raises(ExportFolderError, match="n_head is 4 in config.json but 2 in model.onnx"):
        OnnxGPT.load(folder)
    # the Hugging Face keys (what the other clients read) must agree with mlxgpt's
    folder = _edit_config(exported, tmp_path / "b", lambda c: c.update(n_head=4))
    with pytest.raises(ExportFolderError, match="n_head: found 4, expected 2.*mlxgpt export"):
        OnnxGPT.load(folder)
    folder = _edit_config(exported, tmp_path / "c", lambda c: c.pop("mlxgpt"))
    with pytest.raises(ExportFolderError, match="no 'mlxgpt' key.*not written by `mlxgpt export`"):
        OnnxGPT.load(folder)


def test_folder_exported_before_the_client_layout_still_loads(
    exported: Path, ort: OnnxGPT, tmp_path: Path, capsys
):
    """Old layout: model.onnx at the top, config.json = the GPTConfig, original tokenizer."""
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(exported / MODEL_FILE, legacy / "model.onnx")
    config = json.loads((exported / "config.json").read_text())["mlxgpt"]
    (legacy / "config.json").write_text(json.dumps(config))
    Tokenizer(_without_added_tokens(ort.tokenizer)).save(legacy / "tokenizer.json")
    shutil.copy(exported / "generation_config.json", legacy)
    old = OnnxGPT.load(legacy)
    assert old.model_path == legacy / "model.onnx"
    params = SamplingParams(0.8, seed=4)
    assert "".join(old.generate("All:", 40, params)) == "".join(ort.generate("All:", 40, params))
    assert ort_main(["info", str(legacy)]) == 0
    assert "model.onnx" in capsys.readouterr().out
    # a config with n_head edited in an old folder is caught by the metadata as well
    (legacy / "config.json").write_text(json.dumps({**config, "n_embd": 64, "n_head": 4}))
    with pytest.raises(ExportFolderError, match="does not match the model it was exported"):
        OnnxGPT.load(legacy)


def _without_added_tokens(tokenizer: Tokenizer):
    """The char tokenizer as mlxgpt wrote it before every character was an added token."""
    from tokenizers import Tokenizer as HFTokenizer

    data = json.loads(tokenizer.hf.to_str())
    data["added_tokens"] = []
    return HFTokenizer.from_str(json.dumps(data))


# -- the mlxgpt-ort command -----------------------------------------------------------------
def test_cli_generate_streams_the_same_text(exported: Path, ort: OnnxGPT, capsys):
    args = ["generate", str(exported), "--prompt", "First", "--max-tokens", "30", "--seed", "3"]
    args += ["--temperature", "0.8"]
    assert ort_main(args) == 0
    expected = "".join(ort.generate("First", 30, SamplingParams(temperature=0.8, seed=3)))
    assert capsys.readouterr().out == "First" + expected + "\n"


def test_cli_batch_and_long_prompt_note(exported: Path, ort: OnnxGPT, tmp_path: Path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"All:\n\nFirst Citizen:\n{LONG_PROMPT.replace(chr(10), ' ')}\n")
    args = ["generate", str(exported), "--prompts-file", str(prompts), "--temperature", "0"]
    assert ort_main([*args, "--max-tokens", "12"]) == 0
    captured = capsys.readouterr()
    lines = [p for p in prompts.read_text().splitlines() if p]
    texts = ort.generate_batch(lines, 12, SamplingParams(temperature=0.0))
    for i, (prompt, text) in enumerate(zip(lines, texts, strict=True), 1):
        assert f"--- prompt {i} ---\n{prompt}{text}\n" in captured.out
    assert "the model sees only the last 32" in captured.err


def test_cli_errors(exported: Path, tmp_path: Path, capsys):
    cases = [
        (["generate", str(tmp_path / "nope")], "does not exist"),
        (["generate", str(exported), "--prompt", "Ω"], "character vocabulary"),
        (["generate", str(exported), "--prompt", "a", "--prompts-file", "x"], "either"),
        (["generate", str(exported), "--prompts-file", str(tmp_path / "x")], "cannot read"),
    ]
    for args, message in cases:
        assert ort_main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_cli_tiny_temperature_is_greedy_and_seed_range(exported: Path, ort: OnnxGPT, capsys):
    args = ["generate", str(exported), "--prompt", "All:", "--max-tokens", "20"]
    assert ort_main([*args, "--temperature", "1e-320", "--seed", "4294967295"]) == 0
    assert capsys.readouterr().out == "All:" + "".join(ort.generate("All:", 20)) + "\n"
    with pytest.raises(SystemExit) as info:
        ort_main([*args, "--seed", "100000000000000"])
    assert info.value.code == 2
    assert "--seed: must be a whole number from 0 to 4294967295" in capsys.readouterr().err


def test_cli_info_and_python_dash_m(exported: Path):
    result = subprocess.run(
        [sys.executable, "-m", "mlxgpt_export", "info", str(exported)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "parity measured at export" in result.stdout and '"passed": true' in result.stdout


# -- without MLX ----------------------------------------------------------------------------
WITHOUT_MLX_SCRIPT = """
import io, json, contextlib, sys
try:
    import mlx.core
    mlx_importable = True
except ImportError:
    mlx_importable = False

from mlxgpt_export.exporter import export_checkpoint
from mlxgpt_export.runtime import OnnxGPT
from mlxgpt_export.cli import main
from mlxgpt.sampling import SamplingParams

ckpt, out, prompt = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
export_checkpoint(ckpt, out, quiet=True)
model = OnnxGPT.load(out)
ids = list(model.generate_ids(prompt, 20, SamplingParams(temperature=0.8, seed=7)))
batch = list(model.generate_batch_ids([prompt, prompt[:2]], 5, SamplingParams(temperature=0)))
with contextlib.redirect_stdout(io.StringIO()) as cli_out:
    rc = main(["generate", out, "--prompt", "All:", "--max-tokens", "5"])
print(json.dumps({
    "mlx_importable": mlx_importable,
    "mlx_modules": sorted(m for m in sys.modules if m == "mlx" or m.startswith("mlx.")),
    "ids": ids, "batch_steps": len(batch), "cli_rc": rc, "cli_out": cli_out.getvalue(),
}))
"""


def test_export_and_runtime_work_without_mlx(trained_ckpt: Path, mlx, tmp_path: Path):
    """In a process where `import mlx` fails: export, load, generate (API and CLI)."""
    model, tokenizer = mlx
    prompt = prompt_ids(tokenizer, "First Citizen:")
    code = textwrap.dedent(WITHOUT_MLX_SCRIPT)  # the runtime alone: test_minimal_install.py
    result = subprocess.run(
        [sys.executable, "-c", code, str(trained_ckpt), str(tmp_path / "out"), json.dumps(prompt)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=blocking_env(tmp_path / "site", ("mlx",)),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["mlx_importable"] is False and report["mlx_modules"] == []
    expected = list(generate_tokens(model, prompt, 20, SamplingParams(temperature=0.8, seed=7)))
    assert report["ids"] == expected  # the same tokens MLX generates, computed without MLX
    assert report["batch_steps"] == 5 and report["cli_rc"] == 0
    assert report["cli_out"].startswith("All:") and len(report["cli_out"]) == len("All:") + 5 + 1
    assert np.all(np.array(report["ids"]) < tokenizer.vocab_size)


def test_end_of_text_token_stops_single_and_batched_generation(ort: OnnxGPT, monkeypatch):
    prompts = [prompt_ids(ort.tokenizer, p) for p in ("All:", "First Citizen")]

    def columns(steps):
        return [[step[r] for step in steps if step[r] is not None] for r in range(len(prompts))]

    free = columns(list(ort.generate_batch_ids(prompts, 12)))
    stop = free[1][5]  # a token row 1 draws at its 6th step
    monkeypatch.setattr(OnnxGPT, "eos_id", property(lambda self: stop))

    def cut(row):
        return row[: row.index(stop)] if stop in row else row

    steps = list(ort.generate_batch_ids(prompts, 12))
    rows = columns(steps)
    assert rows == [cut(r) for r in free]
    everyone_stops = all(stop in r for r in free)
    assert len(steps) == (max(r.index(stop) for r in free) if everyone_stops else 12)
    for prompt, row in zip(prompts, rows, strict=True):
        assert list(ort.generate_ids(prompt, 12)) == row
